"""Helpers for the end-to-end pipeline tests (tests/test_pipeline.py): configs, snakemake runs, summaries.

Every pipeline runs in its own working directory (``--directory``) with its own ``config.yaml``; nothing is written
into the checkout's ``results/``.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
TINY_CONFIG = REPO / "tests" / "configs" / "tiny_pacs.yaml"
PACS_ROOT = Path(os.environ.get("ROBUSTFT_PACS_ROOT", REPO.parent / "shared" / "data" / "PACS")).resolve()
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
CORES = int(os.environ.get("ROBUSTFT_TEST_CORES", "2"))

#: Summary columns that measure time, not results: they legitimately differ between two identical runs.
TIMING_COLUMNS = ("train_seconds",)


def deep_update(base: dict, overrides: Mapping) -> dict:
    """``base`` with ``overrides`` merged in recursively (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is _DELETE:
            out[key] = value
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_config(overrides: Mapping | None = None, *, base: str | Path = TINY_CONFIG) -> dict:
    """The tiny test config with an absolute dataset root and ``overrides`` merged in (``None`` deletes a key)."""
    config = yaml.safe_load(Path(base).read_text())
    config.setdefault("dataset", {})["root"] = str(PACS_ROOT)
    config = deep_update(config, overrides or {})
    return _drop_none_markers(config)


_DELETE = object()


def _drop_none_markers(config: dict) -> dict:
    return {k: _drop_none_markers(v) if isinstance(v, dict) else v for k, v in config.items() if v is not _DELETE}


#: Use as an override value to delete a key, e.g. ``{"methods": {"full_ft": {"absent2": DELETE}}}``.
DELETE = _DELETE


def write_config(workdir: str | Path, config: Mapping | None = None, **overrides: Any) -> Path:
    """Write ``config`` (default: the tiny config with ``overrides``) to ``<workdir>/config.yaml``; returns its path."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = dict(config) if config is not None else tiny_config(overrides)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


#: The workflow profile applied to every run started with this Snakefile (unless ``--workflow-profile none``).
WORKFLOW_PROFILE = REPO / "profiles" / "default" / "config.yaml"


def snakemake_command(workdir: str | Path, *args: str, snakefile: str | Path = SNAKEFILE,
                      configfile: str | Path | None = None, profile: bool = True) -> list[str]:
    """``snakemake -s <Snakefile> --directory <workdir> --configfile <workdir>/config.yaml --cores N`` + ``args``.

    The repository's workflow profile (``profiles/default/``) applies, as it does for a user: its rerun triggers,
    ``rerun-incomplete`` and ``keep-going`` are part of what the tests check. Only its ``gpu: 1`` limit is lifted
    (``--resources gpu=N``): on CPU it would merely run the single-threaded feature jobs one at a time.
    ``profile=False`` adds ``--workflow-profile none`` instead.
    """
    workdir = Path(workdir)
    configfile = Path(configfile) if configfile else workdir / "config.yaml"
    cmd = [str(SNAKEMAKE), "-s", str(snakefile), "--directory", str(workdir), "--configfile", str(configfile),
           "--cores", str(CORES)]
    cmd += list(args)
    if not profile:
        cmd += ["--workflow-profile", "none"]
    elif WORKFLOW_PROFILE.is_file():  # last: --resources takes any number of values and would swallow a target
        cmd += ["--resources", f"gpu={CORES}"]
    return cmd


def workflow_profile() -> dict:
    """The settings of ``profiles/default/config.yaml`` ({} when there is none)."""
    return yaml.safe_load(WORKFLOW_PROFILE.read_text()) or {} if WORKFLOW_PROFILE.is_file() else {}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(CORES))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_snakemake(workdir: str | Path, *args: str, timeout: float = 600, check: bool = False,
                  **kwargs: Any) -> subprocess.CompletedProcess:
    """Run snakemake in ``workdir`` (stdout and stderr captured as text); ``check`` raises with the output tail.

    Past ``timeout`` seconds, snakemake and every job it started are killed (not snakemake alone, which would leave
    its jobs running into the next tests) and the test fails with the output so far.
    """
    cmd = snakemake_command(workdir, *args, **kwargs)
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                             cwd=str(workdir), start_new_session=True)
    try:
        stdout, stderr = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(popen)
        stdout, stderr = popen.communicate()
        raise AssertionError(f"snakemake ran past {timeout} s, killed with its jobs: {' '.join(cmd)}\n"
                             f"{output_tail(stdout + stderr)}") from None
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed (exit {proc.returncode}): {' '.join(cmd)}\n{output_tail(proc)}")
    return proc


def output_tail(proc: subprocess.CompletedProcess | str, chars: int = 6000) -> str:
    text = proc if isinstance(proc, str) else (proc.stdout or "") + (proc.stderr or "")
    return text[-chars:]


def run_pipeline(workdir: str | Path, *args: str, timeout: float = 900, **kwargs: Any) -> subprocess.CompletedProcess:
    """A run of the workflow (default target) in ``workdir``; fails the test with the output tail if it fails.

    No ``--rerun-incomplete`` here: the workflow profile sets it (the kill tests rely on that).
    """
    return run_snakemake(workdir, *args, timeout=timeout, check=True, **kwargs)


def dry_run_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from the ``Job stats`` table of ``snakemake -n`` ({} when there is nothing to do)."""
    counts: dict[str, int] = {}
    text = proc.stdout + proc.stderr
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("Job stats"):
            for row in lines[i + 1:]:
                parts = row.split()
                if not parts or set(row.strip()) <= {"-", " "} or parts[0] == "job":
                    if counts and not parts:
                        break
                    continue
                if parts[0] == "total":
                    break
                if len(parts) >= 2 and parts[-1].isdigit():
                    counts[parts[0]] = counts.get(parts[0], 0) + int(parts[-1])
            break
    return counts


#: Rules that read the summary or the finished runs of a whole study (per-class damage, rules/analyses.smk, the
#: report): one job per study or per config, outside :func:`expected_jobs`.
AFTER_SUMMARY_RULES = frozenset({"per_class", "effective_robustness", "paired_tests", "recommendation", "report"})


def expected_jobs(config: dict) -> dict[str, int]:
    """Rule -> the number of jobs a dry run of ``config`` must list (``report`` aside), counted from the studies.

    Caches are shared between studies: one manifest per data key, one pixel cache per (manifest, preprocessing,
    domain, split, cap), one feature cache per (backbone, manifest, domain, split, cap).
    """
    from robustft.config import cap_key, resolved_variant, run_table, study_table, validate_config, variant_protocol

    from robustft.soups import soup_table

    cfg = validate_config(config)
    studies, runs = study_table(cfg), run_table(cfg)
    soups = len(soup_table(cfg, studies))
    subset = sum(variant_protocol(resolved_variant(cfg, r["method"], r["variant"]))["kind"] == "class_subset"
                 for r in runs)
    folds = cfg["calibration"]["pcv_folds"] * subset
    pixels, features = set(), set()
    for s in studies:
        caps = s["dataset_spec"]["max_per_class"]
        splits = [(s["id_domain"], "train"), (s["id_domain"], "val"), (s["id_domain"], "test"),
                  *[(d, "test") for d in s["ood_domains"]]]
        for domain, split in splits:
            pixels.add((s["data"], s["preprocess"], domain, split, cap_key(caps[split])))
            features.add((s["backbone"], s["data"], domain, split, cap_key(caps[split])))
    return {"weights": len({s["backbone"] for s in studies}), "manifest": len({s["data"] for s in studies}), "pixel_cache": len(pixels), "features": len(features),
            "reference": len(studies), "finetune": len(runs), "finetune_pcv": folds, "pcv_logits": folds,
            "sweep": len(runs), "calibrate": len(runs), "study_summary": len(studies), "summary": 1, "all": 1,
            **({"soup": soups, "soup_sweep": soups, "soup_calibrate": soups} if soups else {})}


def only_study(config: dict) -> dict:
    """The study of a config that has exactly one (robustft.config.study_table)."""
    from robustft.config import study_table, validate_config

    (study,) = study_table(validate_config(config))
    return study


def study_dir(workdir: str | Path, config: dict, study: dict | None = None) -> Path:
    """``<workdir>/results/<dataset>/<backbone>``: the folder of ``study`` (default: the config's only study)."""
    study = study or only_study(config)
    return Path(workdir) / "results" / study["dataset"] / study["backbone"]


def run_dir(workdir: str | Path, config: dict, method: str, variant: str, seed: int = 0,
            study: dict | None = None) -> Path:
    """The folder of one run of ``study`` (default: the config's only study)."""
    return study_dir(workdir, config, study) / "runs" / method / variant / f"seed{seed}"


def read_summary(workdir: str | Path):
    """``<workdir>/results/summary.parquet`` as a DataFrame (checked against the documented columns)."""
    from robustft.io.tables import read_table
    from robustft.pipeline.analysis import SUMMARY_COLUMNS

    return read_table(Path(workdir) / "results" / "summary.parquet", SUMMARY_COLUMNS)


def comparable(summary, exclude: Sequence[str] = TIMING_COLUMNS):
    """The summary without timing columns, sorted and re-indexed, for exact comparison."""
    keys = ["method", "variant", "seed", "eval_domain", "split", "alpha", "interpolation", "calibration"]
    frame = summary.drop(columns=[c for c in exclude if c in summary.columns])
    return frame.sort_values(keys).reset_index(drop=True)


def summaries_equal_message(a, b, exclude: Sequence[str] = TIMING_COLUMNS) -> str | None:
    """None when the two summaries are identical (bit for bit, NaN == NaN) apart from ``exclude``; else why not."""
    import numpy as np

    a, b = comparable(a, exclude), comparable(b, exclude)
    if list(a.columns) != list(b.columns):
        return f"columns differ: {list(a.columns)} vs {list(b.columns)}"
    if len(a) != len(b):
        return f"row counts differ: {len(a)} vs {len(b)}"
    problems = []
    for column in a.columns:
        x, y = a[column].to_numpy(), b[column].to_numpy()
        if x.dtype.kind == "f" and y.dtype.kind == "f":
            same = (x == y) | (np.isnan(x) & np.isnan(y))
        else:
            same = np.array([(u == v) or (u != u and v != v) for u, v in zip(x, y)], dtype=bool)
        if not same.all():
            i = int(np.flatnonzero(~same)[0])
            where = a.iloc[i][["method", "variant", "eval_domain", "split", "alpha", "calibration"]].to_dict()
            problems.append(f"{column}: {int((~same).sum())} rows differ, first {where}: {x[i]!r} vs {y[i]!r}")
    return "; ".join(problems) or None


# ----------------------------------------------------------------------------------------------- kill and resume


def process_tree(pid: int) -> list:
    """``pid`` and all its descendants (psutil processes) that still exist."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(popen: subprocess.Popen) -> None:
    """SIGKILL snakemake's process group and every descendant (a job may sit in a group of its own)."""
    tree = process_tree(popen.pid)
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for proc in tree:
        try:
            proc.send_signal(signal.SIGKILL)
        except Exception:  # already gone
            pass
    popen.wait(timeout=60)
    for proc in tree:
        try:
            proc.wait(timeout=30)
        except Exception:
            pass


def run_and_kill(
    workdir: str | Path,
    ready: Callable[[], bool],
    delay: float,
    *args: str,
    timeout: float = 600,
    poll: float = 0.02,
    **kwargs: Any,
) -> dict[str, Any]:
    """Start snakemake in ``workdir`` in its own process group; once ``ready()`` is true, wait ``delay`` s, SIGKILL all.

    Returns ``{"killed": bool, "returncode", "output", "waited_s"}``; ``killed`` is False when snakemake ended
    before ``ready()`` became true (then nothing was killed).
    """
    cmd = snakemake_command(workdir, *args, **kwargs)
    log = Path(workdir) / f"snakemake-kill-{time.time_ns()}.out"
    started = time.monotonic()
    with open(log, "w") as out:
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=str(workdir),
                                 start_new_session=True)
        killed = False
        try:
            while time.monotonic() - started < timeout:
                if popen.poll() is not None:
                    break
                if ready():
                    time.sleep(delay)
                    if popen.poll() is None:
                        kill_tree(popen)
                        killed = True
                    break
                time.sleep(poll)
            else:
                kill_tree(popen)
                raise AssertionError(f"snakemake ran past {timeout} s without reaching the kill point")
        finally:
            if popen.poll() is None:
                kill_tree(popen)
    return {"killed": killed, "returncode": popen.returncode, "output": log.read_text(),
            "waited_s": time.monotonic() - started}
