"""Snakemake scale: dry run of a ~10,000-job sweep, parse time alone, and a no-op rerun of a finished pipeline.

* dry run: a generated config in a temp working directory, one of two shapes (``--shapes``): ``single``, the
  demo's dataset and backbone with its methods x many variants x seeds; ``matrix``, a study matrix of 3 open_clip
  backbones (ViT-B/32, B/16, L/14) x 2 datasets (PACS with ID photo, PACS with ID sketch) x every method, with as
  many variants x seeds as make the same number of jobs (~3 jobs per run: finetune, sweep, calibrate):
  ``snakemake -n -s Snakefile --directory <tmp> --configfile <generated> --workflow-profile none --cores 1 -q``;
  the job count comes from one extra ``-n --quiet rules reason host`` run (untimed, its Job stats table);
* parse alone: the same config with one manifest as the only target (``-n results/data/<data>/manifest.parquet``,
  the Snakefile and config are parsed in full, the DAG holds a few jobs) and ``--list-rules``;
  ``snakemake --version`` gives the interpreter + import floor;
* floor: Snakemake's own cost for as many trivial jobs (3-rule chains, ``script:`` and ``shell:``); the ``vs floor``
  column is the dry run's median over the ``script:`` floor's, measured in the same run;
* no-op rerun: ``tests/configs/tiny_pacs.yaml`` with an absolute ``dataset.root`` is run to completion once in a
  temp directory (``--cores 2``, untimed), then ``snakemake --cores 2`` again (nothing to be done) is timed.

Wall time is the median of ``--repeats`` runs; peak memory is ``/usr/bin/time -v``'s maximum resident set size.

Example: ``python bench/bench_snakemake.py --jobs 10000 --repeats 3``
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import PACS_ROOT, REPO, add_common_args, print_machine, table, wait_for_quiet, write_json  # noqa: E402

from robustft.config import study_table, validate_config  # noqa: E402 (common puts the repository on sys.path)

SNAKEMAKE = Path(sys.executable).with_name("snakemake")
SNAKEFILE = REPO / "Snakefile"
TIME = shutil.which("time") or "/usr/bin/time"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", default="10000", help="approximate job counts of the generated sweeps (comma list)")
    p.add_argument("--seeds", type=int, default=10, help="seeds in the generated sweep")
    p.add_argument("--shapes", default="single,matrix", help="generated configs: single, matrix (comma list)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-root", type=Path, default=PACS_ROOT)
    p.add_argument("--skip-noop", action="store_true", help="skip the tiny pipeline run and its no-op rerun")
    p.add_argument("--noop-cores", type=int, default=2)
    p.add_argument("--keep", type=Path, default=None, help="keep the finished tiny pipeline here (reused if present)")
    add_common_args(p)
    return p.parse_args(argv)


#: The matrix shape: three CLIP backbones, two PACS studies that differ by their ID domain.
MATRIX_BACKBONES = {name: {"name": "open_clip", "model": model, "pretrained": "openai"}
                    for name, model in (("b32", "ViT-B-32"), ("b16", "ViT-B-16"), ("l14", "ViT-L-14"))}
MATRIX_DOMAINS = {"photo": ["art_painting", "cartoon", "sketch"], "sketch": ["photo", "art_painting", "cartoon"]}


def sweep_config(target_jobs: int, seeds: int, root: Path, shape: str = "single") -> tuple[dict, int, str]:
    """A config of ~``target_jobs`` jobs: every method (the demo's, or all eleven for ``matrix``) given enough lr
    variants that studies x runs x 3 jobs ~ ``target_jobs``; returns (config, runs, label)."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["dataset"]["root"] = str(root)
    studies = 1
    if shape == "matrix":
        dataset = config.pop("dataset")
        config.pop("backbone")
        config["datasets"] = {d: {**dataset, "id_domain": d, "ood_domains": ood} for d, ood in MATRIX_DOMAINS.items()}
        config["backbones"] = dict(MATRIX_BACKBONES)
        config["methods"]["flyp"] = {"default": {}}
        studies = len(config["datasets"]) * len(config["backbones"])
    methods = list(config["methods"])
    runs = max(1, round(target_jobs / 3))
    per_method = max(1, round(runs / (studies * len(methods) * seeds)))
    for method in methods:
        base = dict(config["methods"][method].get("default", {}))
        config["methods"][method] = {
            f"lr{i:03d}": {**base, "lr": float(f"{1e-4 * (1 + i / 100):.6g}")} for i in range(per_method)
        }
    config["seeds"] = list(range(seeds))
    runs = studies * len(methods) * per_method * seeds
    where = f"{len(MATRIX_BACKBONES)} backbones x {len(MATRIX_DOMAINS)} datasets x " if shape == "matrix" else ""
    label = f"{shape}: {runs} runs ({where}{len(methods)} methods x {per_method} variants x {seeds} seeds)"
    return config, runs, label


def timed_command(cmd: list[str], cwd: Path) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, max RSS MiB from /usr/bin/time -v, process)."""
    full = [TIME, "-v", *cmd] if Path(TIME).exists() else cmd
    start = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True, cwd=str(cwd))
    wall = time.perf_counter() - start
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return wall, (int(match.group(1)) / 1024 if match else float("nan")), proc


def check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")


def base_cmd(workdir: Path, configfile: Path, cores: int, profile: bool = False) -> list[str]:
    cmd = [str(SNAKEMAKE), "-s", str(SNAKEFILE), "--directory", str(workdir), "--configfile", str(configfile),
           "--cores", str(cores)]
    return cmd if profile else cmd + ["--workflow-profile", "none"]


FLOOR_SNAKEFILE = """
RUNS = [f"r{{i}}" for i in range({runs})]
rule all:
    input: expand("out/{{run}}/c.txt", run=RUNS)
rule a:
    output: "out/{{run}}/a.txt"
    {action}
rule b:
    input: "out/{{run}}/a.txt"
    output: "out/{{run}}/b.txt"
    {action}
rule c:
    input: "out/{{run}}/b.txt"
    output: "out/{{run}}/c.txt"
    {action}
"""


def write_floor_workflow(folder: Path, runs: int, directive: str) -> None:
    """A workflow of ``runs`` chains a -> b -> c with one input each: what Snakemake costs per job by itself."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "s.py").write_text("")
    action = 'script: "s.py"' if directive == "script" else 'shell: "touch {output}"'
    (folder / "Snakefile").write_text(FLOOR_SNAKEFILE.format(runs=runs, action=action))


def job_count(proc: subprocess.CompletedProcess) -> int | None:
    text = proc.stdout + proc.stderr
    match = re.search(r"^total\s+(\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def repeat(cmd: list[str], cwd: Path, n: int, what: str) -> tuple[float, float, float, subprocess.CompletedProcess]:
    walls, rss = [], []
    proc = None
    for _ in range(n):
        wall, mib, proc = timed_command(cmd, cwd)
        check(proc, what)
        walls.append(wall)
        rss.append(mib)
    return statistics.median(walls), min(walls), max(rss), proc


def main(argv=None) -> None:
    args = parse_args(argv)
    wait_for_quiet(args.quiet_load, args.wait_quiet)
    print_machine(f"snakemake {subprocess.run([str(SNAKEMAKE), '--version'], capture_output=True, text=True).stdout.strip()}")
    rows = []
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="robustft-bench-snakemake-") as tmp_name:
        tmp = Path(tmp_name)
        wall, best, mib, _ = repeat([str(SNAKEMAKE), "--version"], tmp, args.repeats, "snakemake --version")
        rows.append({"what": "snakemake --version (interpreter + import floor)", "jobs": 0, "median s": wall,
                     "best s": best, "max RSS MiB": mib, "target": "", "met": ""})
        for target in [int(j) for j in args.jobs.split(",") if j.strip()]:
            timed_cmds = {}  # name -> (command, cwd, row): timed together, one after another in each repeat
            for shape in [x.strip() for x in args.shapes.split(",") if x.strip()]:
                workdir = tmp / f"{shape}{target}"
                workdir.mkdir()
                config, runs, label = sweep_config(target, args.seeds, args.data_root, shape)
                configfile = workdir / "config.yaml"
                configfile.write_text(yaml.safe_dump(config, sort_keys=False))
                count_proc = subprocess.run(base_cmd(workdir, configfile, 1) + ["-n", "--quiet", "rules", "reason",
                                                                                "host"],
                                            capture_output=True, text=True, cwd=str(workdir))
                check(count_proc, "counting dry run")
                jobs = job_count(count_proc)
                print(f"# {label}: {jobs} jobs; loadavg {open('/proc/loadavg').read().split()[0]}", flush=True)
                row = {"what": f"dry run -n -q, {label}", "jobs": jobs, "target": "", "met": ""}
                timed_cmds[f"dry_run_{shape}_{target}"] = (base_cmd(workdir, configfile, 1) + ["-n", "-q"], workdir, row)
                manifest = f"results/data/{study_table(validate_config(config))[0]['data']}/manifest.parquet"
                wall, best, mib, _ = repeat(base_cmd(workdir, configfile, 1) + [manifest, "-n", "-q"], workdir,
                                            args.repeats, "parse-only dry run")
                rows.append({"what": f"parse only ({shape}): -n <one manifest>, same config", "jobs": 1,
                             "median s": wall, "best s": best, "max RSS MiB": mib, "target": "", "met": ""})
                results[f"parse_{shape}_{target}"] = {"median_s": wall, "best_s": best, "max_rss_mib": mib}
                wall, best, mib, _ = repeat(base_cmd(workdir, configfile, 1) + ["--list-rules"], workdir, args.repeats,
                                            "--list-rules")
                rows.append({"what": f"parse only ({shape}): --list-rules, same config", "jobs": 0, "median s": wall,
                             "best s": best, "max RSS MiB": mib, "target": "", "met": ""})
                floor_jobs = jobs or target
            for directive in ("script", "shell"):  # Snakemake's own floor for as many jobs, same shape
                floor_dir = tmp / f"floor_{directive}_{target}"
                write_floor_workflow(floor_dir, -(-floor_jobs // 3), directive)
                row = {"what": f"floor: trivial 3-rule chain per run, `{directive}:` jobs, same job count",
                       "jobs": 3 * -(-floor_jobs // 3), "target": "", "met": ""}
                timed_cmds[f"floor_{directive}_{target}"] = ([str(SNAKEMAKE), "--cores", "1", "-n", "-q"], floor_dir, row)
            walls: dict[str, list[float]] = {name: [] for name in timed_cmds}
            rss: dict[str, list[float]] = {name: [] for name in timed_cmds}
            for _ in range(args.repeats):  # interleaved, so that the machine's load hits every command alike
                for name, (cmd, cwd, _row) in timed_cmds.items():
                    wall, mib, proc = timed_command(cmd, cwd)
                    check(proc, name)
                    walls[name].append(wall)
                    rss[name].append(mib)
            floor = statistics.median(walls[f"floor_script_{target}"])
            for name, (_cmd, _cwd, row) in timed_cmds.items():
                median = statistics.median(walls[name])
                row.update({"median s": median, "best s": min(walls[name]), "max RSS MiB": max(rss[name]),
                            "vs floor": f"{median / floor:.2f}x"})
                rows.append(row)
                results[name] = {"jobs": row["jobs"], "median_s": median, "best_s": min(walls[name]),
                                 "max_rss_mib": max(rss[name]), "vs_floor": median / floor}

        if not args.skip_noop:
            workdir = args.keep or tmp / "tiny"
            workdir.mkdir(parents=True, exist_ok=True)
            config = yaml.safe_load((REPO / "tests" / "configs" / "tiny_pacs.yaml").read_text())
            config["dataset"]["root"] = str(args.data_root)
            configfile = workdir / "config.yaml"
            configfile.write_text(yaml.safe_dump(config, sort_keys=False))
            cmd = base_cmd(workdir, configfile, args.noop_cores, profile=True)
            first_wall, first_mib, proc = timed_command(cmd, workdir)
            check(proc, "tiny pipeline run")
            print(f"# tiny pipeline finished in {first_wall:.1f} s (or was already complete)", flush=True)
            wall, best, mib, proc = repeat(cmd, workdir, args.repeats, "no-op rerun")
            nothing = "Nothing to be done" in proc.stdout + proc.stderr
            ok = wall < 5 and nothing
            rows.append({"what": f"no-op rerun: snakemake --cores {args.noop_cores} on the finished tiny pipeline"
                                 + ("" if nothing else " (WARNING: jobs were scheduled)"),
                         "jobs": 0 if nothing else job_count(proc), "median s": wall, "best s": best,
                         "max RSS MiB": mib, "target": "< 5 s", "met": "yes" if ok else "NO"})
            results["noop"] = {"first_run_s": first_wall, "median_s": wall, "best_s": best, "max_rss_mib": mib,
                               "nothing_to_be_done": nothing}
            wall, best, mib, _ = repeat(cmd + ["-n"], workdir, args.repeats, "no-op dry run")
            rows.append({"what": "no-op dry run (-n) of the finished tiny pipeline", "jobs": 0, "median s": wall,
                         "best s": best, "max RSS MiB": mib, "target": "", "met": ""})
    text = table(rows, ["what", "jobs", "median s", "best s", "max RSS MiB", "vs floor", "target", "met"],
                 title=f"Snakemake timings, median of {args.repeats}")
    write_json(args.json, {"rows": rows, **results, "tables": [text]})


if __name__ == "__main__":
    main()
