"""Chaos test (#16 item 4): SIGKILL the whole pipeline at seeded random points in every stage, rerun it each time
as the README says, and end with exactly what an uninterrupted run gives.

One small configuration (a tiny random-init open_clip at 32 px, a linked 16-images-per-class copy of two PACS
domains, one class-subset run with one PCV fold, two epochs, a resume checkpoint after every step) runs twice in
folders of its own:

- **clean**: uninterrupted. Snakemake's output is watched while it runs, so the test knows every rule of the DAG
  (the stages) and how long each one's jobs take here;
- **chaos**: for each stage, in order, the run is SIGKILLed (Snakemake's process group and every job it started)
  while a job of that stage runs, at a seeded point: a random fraction of the job's clean duration (``elapsed``),
  or the moment a temporary file appears under ``results/`` while it runs (``writing``: mid-write), whichever
  comes first. After each kill the README's recovery runs (``snakemake --unlock``, then the same command). The
  last run goes to the end. A stage whose jobs all ended before their kill point (they ran faster than in the clean
  run) is run again with ``--forcerun <rule>`` and an earlier kill point, at most twice.

Then: every stage was running at one of the kills; after each kill no file under its final name is unreadable (the
atomic writes); at the end a dry run has nothing to do, ``summary.parquet`` equals the clean one as a table
(``train_seconds`` aside: wall time), every ``.safetensors`` file (reference head, run and PCV fold weights) equals
the clean one byte for byte, and the chaos folder holds exactly the clean folder's files: no temporary file, no
resume folder, no partial output left behind.

``ROBUSTFT_CHAOS_SEED`` replays a kill schedule (the seed is printed and named in every failure).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline_utils import (
    DELETE,
    PACS_ROOT,
    _env,
    dry_run_jobs,
    kill_tree,
    output_tail,
    read_summary,
    run_snakemake,
    snakemake_command,
    summaries_equal_message,
    tiny_config,
    write_config,
)

pytestmark = [
    pytest.mark.pipeline,
    pytest.mark.skipif(not PACS_ROOT.is_dir(), reason=f"PACS not found at {PACS_ROOT}"),
]

CHAOS_SEED = int(os.environ.get("ROBUSTFT_CHAOS_SEED", random.SystemRandom().randrange(10**6)))
DOMAINS = ("photo", "sketch")
PER_CLASS = 16
#: A stage's kill lands within this fraction of its job's clean duration: jobs may run faster than in the clean run.
LATEST = 0.6
RUN_TIMEOUT = int(os.environ.get("ROBUSTFT_CHAOS_TIMEOUT", 1800))  # seconds per snakemake run


# ------------------------------------------------------------------------------------------------ watching jobs

_RULE = re.compile(r"^(?:local)?rule (\w+):$")
_JOBID = re.compile(r"^\s+jobid: (\d+)$")
_FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)")


@dataclass
class Job:
    rule: str
    started: float
    finished: float | None = None


@dataclass
class JobWatch:
    """The jobs of one Snakemake run, read from its output file as it grows (start and end times as seen here)."""

    path: Path
    jobs: dict[str, Job] = field(default_factory=dict)
    _offset: int = 0
    _rule: str | None = None
    _partial: str = ""

    def poll(self) -> None:
        now = time.monotonic()
        with open(self.path) as handle:
            handle.seek(self._offset)
            text = handle.read()
            self._offset = handle.tell()
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if match := _RULE.match(line):
                self._rule = match.group(1)
            elif (match := _JOBID.match(line)) and self._rule is not None:
                self.jobs[match.group(1)] = Job(self._rule, now)
                self._rule = None
            elif match := _FINISHED.match(line):
                job = self.jobs.setdefault(match.group(1), Job(match.group(2), now))
                job.finished = now

    def running(self) -> dict[str, Job]:
        """Rule -> its earliest-started job still running."""
        out: dict[str, Job] = {}
        for job in self.jobs.values():
            if job.finished is None and (job.rule not in out or job.started < out[job.rule].started):
                out[job.rule] = job
        return out


def temporary_files(root: Path) -> list[Path]:
    """Files named as temporary under ``root``: ``.<name>.<random>.tmp`` (robustft.io.atomic) or ``*.tmp``."""
    return sorted(p for p in root.rglob("*.tmp")) if root.is_dir() else []


def watched_run(workdir: Path, *args: str, should_kill=None, poll: float = 0.02
                ) -> tuple[JobWatch, dict | None, subprocess.CompletedProcess]:
    """Run snakemake in ``workdir`` (own process group), polling its jobs; ``should_kill(watch)`` returning a dict
    SIGKILLs the whole tree at once. Returns (watch, that dict or None, the process with its output)."""
    out_path = workdir / f"snakemake-{time.time_ns()}.out"
    cmd = snakemake_command(workdir, *args)
    with open(out_path, "w") as out:
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=str(workdir),
                                 start_new_session=True)
    watch, verdict, started = JobWatch(out_path), None, time.monotonic()
    try:
        while popen.poll() is None:
            if time.monotonic() - started > RUN_TIMEOUT:
                raise AssertionError(f"snakemake ran past {RUN_TIMEOUT} s\n{out_path.read_text()[-4000:]}")
            watch.poll()
            verdict = should_kill(watch) if should_kill else None
            if verdict is not None:
                verdict["running"] = sorted(watch.running())  # what the kill hit
                kill_tree(popen)
                break
            time.sleep(poll)
        watch.poll()
    finally:
        if popen.poll() is None:
            kill_tree(popen)
    output = out_path.read_text()
    out_path.unlink()
    return watch, verdict, subprocess.CompletedProcess(cmd, popen.returncode, output, "")


# ---------------------------------------------------------------------------------------------- the configuration


def _mini_pacs(root: Path) -> Path:
    """``PER_CLASS`` images of each class of ``DOMAINS``, as links into PACS (an ``imagefolder`` dataset)."""
    for domain in DOMAINS:
        for class_dir in sorted((PACS_ROOT / domain).iterdir()):
            target = root / domain / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:PER_CLASS]:
                (target / image.name).symlink_to(image.resolve())
    return root


def chaos_config(root: Path, tiny_clip: dict) -> dict:
    return tiny_config({
        "dataset": {"name": "imagefolder", "root": str(root), "id_domain": "photo", "ood_domains": ["sketch"],
                    "max_per_class": {"train": 6, "val": 3, "test": 3}},
        "backbone": {"name": "open_clip", "image_size": DELETE, "model": tiny_clip["model"],
                     "model_config": tiny_clip["model_config"], "pretrained": tiny_clip["checkpoint"],
                     "templates": "simple"},
        "training": {"epochs": 2, "batch_size": 8, "checkpoint_every": 1},
        "methods": {"zeroshot": DELETE, "linear_probe": DELETE,
                    "full_ft": {"default": DELETE,
                                "absent2": {"protocol": {"kind": "class_subset",
                                                         "absent_classes": ["giraffe", "house"]}}}},
        "calibration": {"pcv_folds": 1},
    })


# --------------------------------------------------------------------------------------------------- the checks


def unreadable_outputs(results: Path) -> list[str]:
    """Files under their final name that do not open as what their suffix says (a partial write would not)."""
    import h5py
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from safetensors import safe_open

    def check(path: Path) -> None:
        suffix = path.suffix
        if suffix == ".parquet":
            pq.read_table(path)
        elif suffix == ".h5":
            with h5py.File(path, "r") as handle:
                if not handle.attrs.get("complete"):
                    raise ValueError("not marked complete")
                handle.visititems(lambda _, item: item[...] if isinstance(item, h5py.Dataset) else None)
        elif suffix == ".safetensors":
            with safe_open(str(path), "pt") as handle:
                for key in handle.keys():
                    handle.get_tensor(key)
        elif suffix == ".json":
            json.loads(path.read_text())
        elif suffix == ".pt":
            torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".png":
            with Image.open(path) as image:
                image.verify()

    bad = []
    for path in sorted(p for p in results.rglob("*") if p.is_file() and not p.name.endswith(".tmp")):
        try:
            check(path)
        except Exception as exc:  # any failure to read is the finding
            bad.append(f"{path.relative_to(results)}: {type(exc).__name__}: {exc}")
    return bad


def files_under(workdir: Path) -> set[str]:
    """Every file and folder under ``results/`` (relative paths)."""
    results = workdir / "results"
    return {str(p.relative_to(results)) + ("/" if p.is_dir() else "") for p in results.rglob("*")}


def kill_and_rerun(chaos_dir: Path, stages: list[str], clean_duration: dict[str, float], seed: int) -> dict:
    """Kill the run in ``chaos_dir`` once in each of ``stages`` (a seeded point; see the module docstring), unlock
    and rerun after each kill, then run it to the end. Returns the kills, the unreadable files seen after them, the
    stages no kill landed in, and notes naming the seed."""
    rng = random.Random(seed)
    plan = {stage: {"mode": rng.choice(["elapsed", "writing"]), "fraction": rng.uniform(0.0, LATEST)}
            for stage in stages}
    remaining, kills, unreadable, stale = list(stages), [], [], set()

    def should_kill(watch: JobWatch) -> dict | None:
        running = watch.running()
        target = next((stage for stage in remaining if stage in running), None)
        if target is None:
            return None
        job, how = running[target], plan[target]
        delay = how["fraction"] * clean_duration[target]
        elapsed = time.monotonic() - job.started
        writing = how["mode"] == "writing" and set(temporary_files(chaos_dir / "results")) - stale
        if elapsed >= delay or writing:
            return {"stage": target, **how, "at_s": round(elapsed, 3), "mid_write": bool(writing)}
        return None

    forced, attempts = [], {}
    while remaining:
        stale = set(temporary_files(chaos_dir / "results"))  # left by the last kill: "writing" waits for a new one
        _, kill, _ = watched_run(chaos_dir, *forced, should_kill=should_kill)
        if kill is None:
            # the run went to the end: the stages left ran faster here than in the clean run. Run the first again
            # (--forcerun: it and what follows it) with an earlier kill point; at most twice per stage.
            stage = remaining[0]
            attempts[stage] = attempts.get(stage, 0) + 1
            if attempts[stage] > 2:
                remaining.pop(0)  # left to test_every_stage_was_killed
                forced = []
                continue
            plan[stage]["fraction"] /= 4
            forced = ["--forcerun", stage]
            continue
        kill["forced"] = bool(forced)
        kill["temporary"] = [str(p.relative_to(chaos_dir)) for p in temporary_files(chaos_dir / "results")]
        kills.append(kill)
        unreadable += [f"after kill {len(kills)} ({kill['stage']}): {b}" for b in
                       unreadable_outputs(chaos_dir / "results")]
        remaining = [stage for stage in remaining if stage not in kill["running"]]
        forced = []
        unlock = run_snakemake(chaos_dir, "--unlock", timeout=300)  # the README: "Nothing computed is lost to a crash"
        assert unlock.returncode == 0, output_tail(unlock)
    final = run_snakemake(chaos_dir, timeout=RUN_TIMEOUT)
    notes = {"seed": seed, "kills": kills}
    print(f"chaos schedule: {json.dumps(notes)}")
    assert final.returncode == 0, f"the run after the last kill failed ({notes})\n{output_tail(final)}"
    return {"kills": kills, "notes": notes, "unreadable": unreadable}


# ---------------------------------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def chaos(tmp_path_factory, tiny_open_clip):
    base = tmp_path_factory.mktemp("chaos")
    config = chaos_config(_mini_pacs(base / "PACS"), tiny_open_clip)

    clean_dir = base / "clean"
    write_config(clean_dir, config)
    clean_watch, _, clean_proc = watched_run(clean_dir)
    assert clean_proc.returncode == 0, f"the clean run failed\n{output_tail(clean_proc)}"
    stages = [rule for rule in dry_run_jobs(clean_proc) if rule != "all"]
    durations = {}
    for job in clean_watch.jobs.values():
        assert job.finished is not None, job
        durations.setdefault(job.rule, []).append(job.finished - job.started)
    clean_duration = {rule: min(times) for rule, times in durations.items()}

    chaos_dir = base / "chaos"
    write_config(chaos_dir, config)
    return {"clean": clean_dir, "chaos": chaos_dir, "stages": stages,
            **kill_and_rerun(chaos_dir, stages, clean_duration, CHAOS_SEED)}


def test_every_stage_was_killed(chaos):
    assert {"finetune", "finetune_pcv", "pcv_logits", "sweep", "calibrate", "features", "report"} <= set(
        chaos["stages"]), chaos["stages"]
    hit = set().union(*(kill["running"] for kill in chaos["kills"])) if chaos["kills"] else set()
    assert set(chaos["stages"]) <= hit, f"stages no kill landed in: {sorted(set(chaos['stages']) - hit)} " \
                                        f"({chaos['notes']})"


def test_no_kill_left_a_partial_file_under_a_final_name(chaos):
    assert chaos["unreadable"] == [], f"{chaos['unreadable']} ({chaos['notes']})"


def test_the_rerun_finished_everything(chaos):
    proc = run_snakemake(chaos["chaos"], "-n", timeout=300)
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr, \
        f"a dry run after the chaos run still has jobs {dry_run_jobs(proc)} ({chaos['notes']})\n{output_tail(proc)}"


def test_the_summary_equals_the_uninterrupted_runs(chaos):
    message = summaries_equal_message(read_summary(chaos["chaos"]), read_summary(chaos["clean"]))
    assert message is None, f"{message} ({chaos['notes']})"


def test_every_weights_file_equals_the_uninterrupted_runs_byte_for_byte(chaos):
    clean = sorted((chaos["clean"] / "results").rglob("*.safetensors"))
    names = [str(p.relative_to(chaos["clean"])) for p in clean]
    assert any("/pcv/fold0/" in n for n in names) and any("/reference/" in n for n in names) and len(names) >= 3, names
    different = [n for n in names if not (chaos["chaos"] / n).is_file()
                 or (chaos["chaos"] / n).read_bytes() != (chaos["clean"] / n).read_bytes()]
    assert different == [], f"weights that differ from the uninterrupted run: {different} ({chaos['notes']})"


def test_no_temporary_or_partial_file_is_left(chaos):
    extra = sorted(files_under(chaos["chaos"]) - files_under(chaos["clean"]))
    missing = sorted(files_under(chaos["clean"]) - files_under(chaos["chaos"]))
    assert (extra, missing) == ([], []), f"left behind {extra}, missing {missing} ({chaos['notes']})"
    ours = [p for p in temporary_files(chaos["chaos"] / ".snakemake" / "robustft")]
    assert ours == [], ours
