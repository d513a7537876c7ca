"""The whole ``make demo`` equivalent: wall time, CPU time and peak memory of ``snakemake --cores 2`` on config.yaml.

Runs in a temp working directory (never the checkout's ``results/``) with ``config.yaml``'s ``dataset.root`` made
absolute, through the default workflow profile as ``make demo`` does:
``snakemake -s Snakefile --directory <tmp> --configfile <tmp>/config.yaml --cores 2``.

Peak memory two ways: ``/usr/bin/time -v``'s "maximum resident set size" (the largest single process of the tree)
and the peak of the summed RSS of snakemake and all its descendants, sampled with psutil every ``--interval`` s.
Then times a no-op rerun of the finished demo (median of 3). Also reports how the wall time splits over the rules
(from snakemake's job start/finish lines) and the runs' own ``wall_time_s``.

Example: ``python bench/bench_demo.py --cores 2`` (about 15 minutes on 2 cores; run it alone, last, once)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from common import (  # noqa: E402
    PACS_ROOT,
    REPO,
    add_common_args,
    print_machine,
    table,
    wait_for_quiet,
    work_directory,
    write_json,
)

SNAKEMAKE = Path(sys.executable).with_name("snakemake")
TIME = shutil.which("time") or "/usr/bin/time"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--config", type=Path, default=REPO / "config.yaml")
    p.add_argument("--data-root", type=Path, default=PACS_ROOT)
    p.add_argument("--workdir", type=Path, default=None, help="run here (kept) instead of a temp directory")
    p.add_argument("--interval", type=float, default=0.5, help="psutil sampling interval, s")
    p.add_argument("--timeout", type=float, default=3600)
    add_common_args(p)
    return p.parse_args(argv)


class TreeSampler(threading.Thread):
    """Samples the summed RSS (and count) of a process and its descendants."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_mib, self.peak_procs, self.samples = 0.0, 0, 0
        self.peak_detail: list[tuple[str, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total, detail = 0.0, []
            for proc in procs:
                try:
                    rss = proc.memory_info().rss / 2**20
                    total += rss
                    detail.append((" ".join(proc.cmdline()[:4])[-80:], rss))
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self.samples += 1
            if total > self.peak_mib:
                self.peak_mib, self.peak_detail = total, sorted(detail, key=lambda d: -d[1])[:6]
            self.peak_procs = max(self.peak_procs, len(procs))
            self.stop.wait(self.interval)


def rule_times(output: str) -> list[dict]:
    """Per rule: job count, summed and longest job durations, from snakemake's own job start/finish lines.

    Snakemake prints ``[<date>]`` before ``rule <name>:`` ... ``jobid: <n>`` when a job starts and before
    ``Finished jobid: <n> (Rule: <name>)`` when it ends (1 s resolution).
    """
    from datetime import datetime

    stamp, pending, starts, durations = None, None, {}, {}
    for line in output.splitlines():
        text = line.strip()
        m = re.fullmatch(r"\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]", text)
        if m:
            stamp = datetime.strptime(" ".join(m.group(1).split()), "%a %b %d %H:%M:%S %Y")
            continue
        m = re.match(r"(?:local)?rule (\w+):$", text)
        if m:
            pending = m.group(1)
            continue
        m = re.match(r"jobid: (\d+)$", text)
        if m and pending and stamp:
            starts[m.group(1)] = (pending, stamp)
            pending = None
            continue
        m = re.match(r"Finished jobid: (\d+)", text)
        if m and m.group(1) in starts and stamp:
            rule, began = starts.pop(m.group(1))
            durations.setdefault(rule, []).append((stamp - began).total_seconds())
    return [{"rule": r, "jobs": len(v), "sum of job s": float(sum(v)), "longest job s": float(max(v))}
            for r, v in sorted(durations.items(), key=lambda kv: -sum(kv[1]))]


def main(argv=None) -> None:
    args = parse_args(argv)
    with work_directory(args.workdir, "robustft-bench-demo-") as workdir:
        run_demo(args, workdir)


def run_demo(args: argparse.Namespace, workdir: Path) -> None:
    """The demo in ``workdir``: timed, sampled, then a no-op rerun; print and write the tables."""
    config = yaml.safe_load(args.config.read_text())
    config["dataset"]["root"] = str(args.data_root.resolve())
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile", str(configfile),
           "--cores", str(args.cores)]
    wait_for_quiet(args.quiet_load, args.wait_quiet)
    info = print_machine(f"demo: {' '.join(cmd[1:])}")
    start = time.perf_counter()
    proc = subprocess.Popen([TIME, "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=str(workdir))
    sampler = TreeSampler(proc.pid, args.interval)
    sampler.start()
    try:
        output, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    (Path(tempfile.gettempdir()) / "robustft-bench-demo-last.log").write_text(output)

    def field(pattern: str, cast=float):
        m = re.search(pattern, output)
        return cast(m.group(1)) if m else float("nan")

    user = field(r"User time \(seconds\): ([\d.]+)")
    system = field(r"System time \(seconds\): ([\d.]+)")
    max_rss = field(r"Maximum resident set size \(kbytes\): (\d+)") / 1024
    steps = re.findall(r"(\d+) of (\d+) steps \(100%\) done", output)
    done = (workdir / "results" / "summary.parquet").is_file() and (workdir / "results" / "report" / "index.html").is_file()
    rows = [{
        "command": f"snakemake --cores {args.cores} (config.yaml, default profile)",
        "exit": proc.returncode, "jobs": int(steps[-1][1]) if steps else "n/a", "wall s": wall, "wall min": wall / 60,
        "CPU s (user+sys)": user + system, "CPU use % of cores": 100 * (user + system) / (wall * args.cores),
        "max RSS single process MiB": max_rss, "peak summed tree RSS MiB": sampler.peak_mib,
        "peak processes": sampler.peak_procs, "complete": "yes" if done else "NO",
    }]
    if done:  # a no-op rerun of the finished demo, as a user reruns after changing nothing (median of 3)
        noop = []
        for _ in range(3):
            t0 = time.perf_counter()
            again = subprocess.run(cmd, capture_output=True, text=True, cwd=str(workdir))
            noop.append(time.perf_counter() - t0)
        nothing = "Nothing to be done" in again.stdout + again.stderr
        rows.append({"command": "the same again: no-op rerun of the finished demo (median of 3)",
                     "exit": again.returncode, "jobs": 0 if nothing else "WARNING: jobs ran",
                     "wall s": sorted(noop)[1], "wall min": sorted(noop)[1] / 60, "complete": "yes"})
    text = table(rows, title="make demo equivalent")
    runs = []
    for run_json in sorted((workdir / "results" / "runs").glob("*/*/seed*/run.json")):
        record = json.loads(run_json.read_text())
        runs.append({"run": f"{record['method']}/{record['variant']}/seed{record['seed']}",
                     "steps": record.get("steps"), "wall_time_s": record.get("wall_time_s")})
    text_runs = table(runs, title="Fine-tuning runs (run.json wall_time_s)") if runs else ""
    per_rule = rule_times(output)
    text_rules = table(per_rule, title="Time by rule (job start/finish lines of snakemake's output; jobs overlap on 2 cores)") if per_rule else ""
    print("\n# at peak summed RSS: " + "; ".join(f"{c} {m:.0f} MiB" for c, m in sampler.peak_detail), flush=True)
    if proc.returncode != 0:
        print(output[-4000:], flush=True)
    write_json(args.json, {"rows": rows, "runs": runs, "per_rule": per_rule, "peak_detail": sampler.peak_detail,
                           "tables": [text, text_runs, text_rules]})


if __name__ == "__main__":
    main()
