"""Snakemake scale: dry run of a ~10,000-job sweep, parse time alone, and a no-op rerun of a finished pipeline.

* dry run: a generated config (the demo's methods x many variants x seeds; ~3 jobs per run: finetune, sweep,
  calibrate) in a temp working directory:
  ``snakemake -n -s Snakefile --directory <tmp> --configfile <generated> --workflow-profile none --cores 1 -q``;
  the job count comes from one extra ``-n --quiet rules reason host`` run (untimed, its Job stats table);
* parse alone: the same config with the manifest as the only target (``-n results/data/pacs/manifest.parquet``,
  the Snakefile and config are parsed in full, the DAG holds one job) and ``--list-rules``; ``snakemake --version``
  gives the interpreter + import floor;
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

SNAKEMAKE = Path(sys.executable).with_name("snakemake")
SNAKEFILE = REPO / "Snakefile"
TIME = shutil.which("time") or "/usr/bin/time"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", default="10000", help="approximate job counts of the generated sweeps (comma list)")
    p.add_argument("--seeds", type=int, default=10, help="seeds in the generated sweep")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-root", type=Path, default=PACS_ROOT)
    p.add_argument("--skip-noop", action="store_true", help="skip the tiny pipeline run and its no-op rerun")
    p.add_argument("--noop-cores", type=int, default=2)
    p.add_argument("--keep", type=Path, default=None, help="keep the finished tiny pipeline here (reused if present)")
    add_common_args(p)
    return p.parse_args(argv)


def sweep_config(target_jobs: int, seeds: int, root: Path) -> tuple[dict, int]:
    """The demo config with every method given enough lr variants that runs x 3 jobs ~ ``target_jobs``."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["dataset"]["root"] = str(root)
    methods = list(config["methods"])
    runs = max(1, round(target_jobs / 3))
    per_method = max(1, round(runs / (len(methods) * seeds)))
    for method in methods:
        base = dict(config["methods"][method].get("default", {}))
        config["methods"][method] = {
            f"lr{i:03d}": {**base, "lr": float(f"{1e-4 * (1 + i / 100):.6g}")} for i in range(per_method)
        }
    config["seeds"] = list(range(seeds))
    return config, len(methods) * per_method * seeds


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
            workdir = tmp / f"sweep{target}"
            workdir.mkdir()
            config, runs = sweep_config(target, args.seeds, args.data_root)
            configfile = workdir / "config.yaml"
            configfile.write_text(yaml.safe_dump(config, sort_keys=False))
            count_proc = subprocess.run(base_cmd(workdir, configfile, 1) + ["-n", "--quiet", "rules", "reason", "host"],
                                        capture_output=True, text=True, cwd=str(workdir))
            check(count_proc, "counting dry run")
            jobs = job_count(count_proc)
            label = f"{runs} runs ({len(config['methods'])} methods x {len(next(iter(config['methods'].values())))} variants x {args.seeds} seeds)"
            wall, best, mib, _ = repeat(base_cmd(workdir, configfile, 1) + ["-n", "-q"], workdir, args.repeats, "dry run")
            ok = wall < 15 if jobs and jobs >= 9000 else None
            rows.append({"what": f"dry run -n -q, {label}", "jobs": jobs, "median s": wall, "best s": best,
                         "max RSS MiB": mib, "target": "< 15 s" if ok is not None else "",
                         "met": "" if ok is None else ("yes" if ok else "NO")})
            results[f"dry_run_{target}"] = {"jobs": jobs, "runs": runs, "median_s": wall, "best_s": best, "max_rss_mib": mib}
            wall, best, mib, _ = repeat(base_cmd(workdir, configfile, 1) + ["results/data/pacs/manifest.parquet", "-n", "-q"],
                                        workdir, args.repeats, "parse-only dry run")
            rows.append({"what": f"parse only: -n results/data/pacs/manifest.parquet, same config", "jobs": 1,
                         "median s": wall, "best s": best, "max RSS MiB": mib, "target": "", "met": ""})
            results[f"parse_{target}"] = {"median_s": wall, "best_s": best, "max_rss_mib": mib}
            wall, best, mib, _ = repeat(base_cmd(workdir, configfile, 1) + ["--list-rules"], workdir, args.repeats,
                                        "--list-rules")
            rows.append({"what": "parse only: --list-rules, same config", "jobs": 0, "median s": wall, "best s": best,
                         "max RSS MiB": mib, "target": "", "met": ""})
            print(f"# {label}: {jobs} jobs measured; loadavg {open('/proc/loadavg').read().split()[0]}", flush=True)
            for directive in ("script", "shell"):  # Snakemake's own floor for as many jobs, same shape
                floor_dir = tmp / f"floor_{directive}_{target}"
                write_floor_workflow(floor_dir, -(-(jobs or target) // 3), directive)
                wall, best, mib, _ = repeat([str(SNAKEMAKE), "--cores", "1", "-n", "-q"], floor_dir, args.repeats,
                                            f"floor dry run ({directive})")
                rows.append({"what": f"floor: trivial 3-rule chain per run, `{directive}:` jobs, same job count",
                             "jobs": 3 * -(-(jobs or target) // 3), "median s": wall, "best s": best,
                             "max RSS MiB": mib, "target": "", "met": ""})
                results[f"floor_{directive}_{target}"] = {"median_s": wall, "best_s": best}

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
    text = table(rows, ["what", "jobs", "median s", "best s", "max RSS MiB", "target", "met"],
                 title=f"Snakemake timings, median of {args.repeats}")
    write_json(args.json, {"rows": rows, **results, "tables": [text]})


if __name__ == "__main__":
    main()
