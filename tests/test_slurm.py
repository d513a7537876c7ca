"""The pipeline through the SLURM executor, on a throw-away single-node Slurm 22.05 cluster (tests/slurm/cluster.sh).

One module-scoped cluster (started here, always stopped here) and one pipeline run on it:

- a tiny PACS configuration (zeroshot + full_ft, one OOD domain, alphas 0 and 1, a resume checkpoint after every
  step) runs with the real profile, exactly as a user would: ``--profile slurm`` plus the test cluster's overrides
  (``tests/slurm/test_profile``), the workflow profile ``profiles/default`` applied automatically;
- while it runs, the full_ft fine-tuning job is ``scancel``-ed as soon as it has written a resume checkpoint; the
  profile's ``retries`` resubmits it and it resumes from that checkpoint;
- a second full_ft variant trains with ``devices: 2``: one Slurm job (``--gpus=2 --nodes=1``, one task) whose
  fine-tuning starts 2 torch.distributed ranks (gloo: the node's GPUs are names only), as torchrun would;
- at the same time the same configuration runs locally (``--cores 2``) in another folder, as the reference.

Then: every job of the local run that is not a local rule (summary, report, all) ran inside a COMPLETED Slurm job of
the run (``sacct``, the job comments and the jobs' own logs), GPU rules got a (fake) GPU on the ``gpu`` partition,
the cancelled job is the only one that did not complete, the resumed run reports ``resumed_at_step`` > 0 and its
weights equal, bit for bit, those of an uninterrupted fine-tuning of the same inputs (tests/slurm/replay_finetune.py),
and the summary equals the local run's on every column but ``train_seconds``. The reference head and the fine-tuned
weights equal the local run's bit for bit too: every job runs torch with the config's compute.cpu_threads threads,
whatever cores Slurm gives it.

Independent of the cluster: ``snakemake --profile slurm -n`` from the repository root prints the resources each rule
would request, as slurm/profile.yaml sets them, and writes nothing under results/.

The run uses ``--slurm-status-command squeue``: with the profile's default (sacct), plugin 2.8.0 never notices a
cancelled job (sacct says "CANCELLED by 0", it matches only "CANCELLED") and Snakemake waits forever.
``sacct`` (slurmdbd runs on the test cluster) is still what checks the jobs afterwards.

Needs root (Debian's slurmctld, slurmd, slurmdbd, munge and MariaDB are installed with apt-get where missing, the
daemons run as root); skipped otherwise, or with ROBUSTFT_REQUIRE_SLURM=1 failed instead (for CI). The cluster's
state lives in $SLURM_TEST_DIR (default /tmp/robustft-slurm-pytest, ports from $SLURM_TEST_PORT_BASE, default
16900: apart from a developer's cluster started with cluster.sh's defaults). A cluster already running there is used
and left running; one started here is stopped here, and the test checks that none of its daemons is left.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline_utils import (
    AFTER_SUMMARY_RULES,
    DELETE,
    PACS_ROOT,
    REPO,
    SNAKEFILE,
    SNAKEMAKE,
    kill_tree,
    read_summary,
    run_dir,
    snakemake_command,
    summaries_equal_message,
    tiny_config,
    write_config,
)

pytestmark = pytest.mark.slurm

CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
SLURM_PROFILE = REPO / "slurm"
TEST_PROFILE = REPO / "tests" / "slurm" / "test_profile"
WORKFLOW_PROFILE_DIR = REPO / "profiles" / "default"
SLURM_TEST_DIR = Path(os.environ.get("SLURM_TEST_DIR", "/tmp/robustft-slurm-pytest"))
SLURM_TEST_PORT_BASE = os.environ.get("SLURM_TEST_PORT_BASE", "16900")
REQUIRE_SLURM = os.environ.get("ROBUSTFT_REQUIRE_SLURM", "") not in ("", "0")
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
#: programs cluster.sh needs; it apt-get installs the missing ones
SLURM_PROGRAMS = ("slurmctld", "slurmd", "sbatch", "munged", "slurmdbd", "mariadbd")
LOCAL_RULES = {"weights", "study_summary", "summary", "report", "all"}
GPU_RULES = {"features", "finetune", "finetune_pcv", "sweep", "pcv_logits", "soup", "soup_sweep"}
RUN_TIMEOUT = float(os.environ.get("ROBUSTFT_SLURM_TIMEOUT", "1200"))

#: a full_ft variant trained by 2 data-parallel ranks (gloo: the test node's GPUs are names only) in one Slurm job
DDP_VARIANT, DDP_RANKS = "ranks2", 2

#: The tiny PACS config, smaller still: zeroshot and full_ft only, one OOD domain, two alphas. Batches of 4 give
#: full_ft 11 optimizer steps, with a resume checkpoint after each: a wide window to cancel the job in.
OVERRIDES = {
    "dataset": {"ood_domains": ["sketch"]},
    "training": {"checkpoint_every": 1, "batch_size": 4},
    "methods": {"linear_probe": DELETE, "full_ft": {"absent2": DELETE, DDP_VARIANT: {"devices": DDP_RANKS}}},
    "sweep": {"alphas": [0.0, 1.0]},
}
CANCELLED_RUN = ("full_ft", "default", 0)


# --------------------------------------------------------------------------------------------------- the cluster


def _cluster_env() -> dict[str, str]:
    env = dict(os.environ)
    env["SLURM_TEST_DIR"] = str(SLURM_TEST_DIR)
    env["SLURM_TEST_PORT_BASE"] = SLURM_TEST_PORT_BASE
    # what `eval "$(bash tests/slurm/cluster.sh env)"` sets: the client commands (and the jobs' nested srun, which
    # loses SLURM_CONF in the plugin's job step) talk to the test cluster through the wrappers in $D/bin
    env["SLURM_CONF"] = str(SLURM_TEST_DIR / "etc" / "slurm.conf")
    env["PATH"] = os.pathsep.join([str(SLURM_TEST_DIR / "bin"), env.get("PATH", ""), "/usr/sbin", "/usr/bin"])
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cluster_sh(command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SH), command], capture_output=True, text=True, timeout=timeout,
                          env=_cluster_env(), cwd=str(REPO))


def _daemon_pids(status_output: str) -> dict[str, int]:
    """``{daemon: pid}`` of the daemons ``cluster.sh status`` reports running."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\S+)\s+running \(pid (\d+)\)", status_output, re.M)}


def _not_available(reason: str):
    if REQUIRE_SLURM:
        pytest.fail(f"ROBUSTFT_REQUIRE_SLURM is set, but {reason}")
    pytest.skip(reason)


def _program_missing(name: str) -> bool:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    return shutil.which(name, path=path) is None


def _stop_and_check(cluster: SimpleNamespace) -> None:
    """``cluster.sh stop``, then: the status command reports every daemon stopped and no daemon started here lives."""
    if not cluster.owned or cluster.stopped:
        return
    stop = _cluster_sh("stop", timeout=180)
    cluster.stopped = True
    assert stop.returncode == 0, f"cluster.sh stop failed:\n{stop.stdout}{stop.stderr}"
    status = _cluster_sh("status")
    assert status.returncode != 0, f"cluster.sh status still reports the cluster up:\n{status.stdout}"
    assert not _daemon_pids(status.stdout), f"daemons still running after cluster.sh stop:\n{status.stdout}"
    for name, pid in cluster.pids.items():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue  # gone
        assert comm != name[:15], f"{name} (pid {pid}), started by this test, is still running after cluster.sh stop"


@pytest.fixture(scope="module")
def cluster():
    """The single-node test cluster: started (and the packages installed) if needed, always stopped at the end."""
    if not CLUSTER_SH.is_file():
        pytest.fail(f"{CLUSTER_SH} is missing")
    missing = [p for p in SLURM_PROGRAMS if _program_missing(p)]
    if missing and os.geteuid() != 0:
        _not_available(f"Slurm is not installed ({', '.join(missing)} missing) and only root can install it")
    if missing and _program_missing("apt-get"):
        _not_available(f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get to install it")
    if os.geteuid() != 0:
        _not_available("the test cluster's daemons (slurmd, munged, ...) run as root: run the tests as root")
    before = _cluster_sh("status")
    owned = before.returncode != 0  # a cluster that is fully up already is used as it is and left running
    cluster = SimpleNamespace(owned=owned, stopped=False, pids={}, env=_cluster_env(), dir=SLURM_TEST_DIR)
    try:
        started = time.monotonic()
        start = _cluster_sh("start", timeout=1200)  # apt-get may have to download the packages
        if start.returncode != 0:
            log = start.stdout + start.stderr
            if re.search(r"apt-get (install|update).* failed|need root to apt-get", log):
                _not_available(f"Slurm could not be installed with apt-get:\n{log[-3000:]}")
            pytest.fail(f"cluster.sh start failed (exit {start.returncode}):\n{log[-6000:]}")
        status = _cluster_sh("status")
        assert status.returncode == 0, f"cluster.sh status after start:\n{status.stdout}{status.stderr}"
        cluster.pids = _daemon_pids(status.stdout) if owned else {}
        cluster.start_seconds = time.monotonic() - started
        cluster.status = status.stdout
        yield cluster
    finally:
        _stop_and_check(cluster)


def _slurm(cluster, *args: str, check: bool = True) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=60, env=cluster.env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {proc.stderr}")
    return proc.stdout


# ------------------------------------------------------------------------------------------------ log parsing

_JOB_BLOCK = re.compile(r"^(local)?rule (\w+):\n((?:    .*\n)*)", re.M)


def _executed_jobs(text: str, *, local_only: bool) -> list[tuple[str, str]]:
    """``(rule, wildcards)`` of every job block Snakemake printed (``localrule X:`` blocks only if ``local_only``)."""
    jobs = []
    for match in _JOB_BLOCK.finditer(text):
        if local_only and not match[1]:
            continue
        wildcards = re.search(r"^    wildcards: (.*)$", match[3], re.M)
        jobs.append((match[2], wildcards[1].strip() if wildcards else ""))
    return jobs


def _submissions(text: str) -> dict[str, Path]:
    """Slurm job ID -> its Slurm log, from the main Snakemake output."""
    found = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.?$", text, re.M)
    return {job: Path(log) for job, log in found}


def _sacct_jobs(cluster, run_name: str, since: str, expected: set[str]) -> dict[str, dict[str, str]]:
    """The run's Slurm jobs from sacct (waiting a little for slurmdbd to have every job's final state)."""
    fields = ["JobIdRaw", "State", "Comment", "AllocTRES", "Partition", "JobName"]
    deadline = time.monotonic() + 60
    while True:
        out = _slurm(cluster, "sacct", "-X", "-P", "-n", "--name", run_name, "-S", since,
                     "--format=" + ",".join(fields))
        jobs = {row[0]: dict(zip(fields, row)) for row in (line.split("|") for line in out.splitlines() if line)}
        settled = set(jobs) >= expected and all(
            j["State"] not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED") for j in jobs.values())
        if settled or time.monotonic() > deadline:
            return jobs
        time.sleep(2)


def _job_env(job_id: str) -> list[dict[str, str]]:
    """The environments of this machine's processes that belong to Slurm job ``job_id``."""
    envs = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            raw = (proc / "environ").read_bytes()
        except OSError:
            continue
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        if env.get("SLURM_JOB_ID") == job_id:
            envs.append(env)
    return envs


# ------------------------------------------------------------------------------------------------ the runs


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory) -> SimpleNamespace:
    """The config through Slurm (cancelling full_ft once mid-training) and, at the same time, locally."""
    if not PACS_ROOT.is_dir():
        pytest.skip(f"PACS not found at {PACS_ROOT}")
    config = tiny_config(OVERRIDES)
    local_dir, slurm_dir = tmp_path_factory.mktemp("slurm_local"), tmp_path_factory.mktemp("slurm_cluster")
    write_config(local_dir, config)
    write_config(slurm_dir, config)
    env = cluster.env
    method, variant, seed = CANCELLED_RUN
    cancelled_dir = run_dir(slurm_dir, config, method, variant, seed)
    resume_file = cancelled_dir.with_name(cancelled_dir.name + ".resume") / "resume.pt"

    # the local reference run, in the background (the Slurm run spends most of its time waiting for the cluster)
    local_log = local_dir / "snakemake.out"
    local_cmd = snakemake_command(local_dir, "results/summary.parquet")
    slurm_cmd = [str(SNAKEMAKE), "-s", str(SNAKEFILE), "--directory", str(slurm_dir), "--configfile",
                 str(slurm_dir / "config.yaml"), "--cores", "all", "--profile", str(SLURM_PROFILE), "--profile",
                 str(TEST_PROFILE), "--slurm-status-command", "squeue",
                 # the profiles cap `gpu` at 1 a job; a variant of k devices needs k (README, "Fine-tuning on
                 # several devices"); --resources replaces the profiles' whole block, so group_slot is repeated
                 "--resources", f"gpu={DDP_RANKS}", "group_slot=1"]
    slurm_log = slurm_dir / "snakemake.out"
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 120))
    cancel = SimpleNamespace(job=None, at_s=None, state=None, envs=[])
    started = time.monotonic()
    with open(local_log, "w") as lout, open(slurm_log, "w") as sout:
        local = subprocess.Popen(local_cmd, stdout=lout, stderr=subprocess.STDOUT, env=env, cwd=str(local_dir),
                                 start_new_session=True)
        slurm = subprocess.Popen(slurm_cmd, stdout=sout, stderr=subprocess.STDOUT, env=env, cwd=str(slurm_dir),
                                 start_new_session=True)
        try:
            while slurm.poll() is None:
                if time.monotonic() - started > RUN_TIMEOUT:
                    raise AssertionError(f"the Slurm run took longer than {RUN_TIMEOUT} s:\n"
                                         f"{slurm_log.read_text()[-6000:]}")
                if cancel.job is None and resume_file.is_file():
                    # full_ft has checkpointed at least one step: cancel its Slurm job now, mid-training
                    name = re.search(r"SLURM run ID: (\S+)", slurm_log.read_text())
                    assert name, "no 'SLURM run ID' in Snakemake's output"
                    queue = _slurm(cluster, "squeue", "-h", "--name", name[1], "-o", "%i|%T|%k")
                    # the plugin's comment: rule_<rule>_wildcards_<every wildcard value, joined by _> (the study's
                    # dataset and backbone first)
                    comment = re.compile(rf"rule_finetune_wildcards_\S*_{method}_{variant}_{seed}")
                    running = [line.split("|") for line in queue.splitlines()
                               if comment.fullmatch(line.rsplit("|", 1)[-1])]
                    assert len(running) == 1, f"no single Slurm job for {comment.pattern} in squeue:\n{queue}"
                    cancel.job, cancel.state = running[0][0], running[0][1]
                    cancel.envs = _job_env(cancel.job)
                    _slurm(cluster, "scancel", cancel.job)
                    cancel.at_s = time.monotonic() - started
                time.sleep(0.1)
            slurm_seconds = time.monotonic() - started
            local.wait(timeout=max(60.0, RUN_TIMEOUT - (time.monotonic() - started)))
        finally:
            for proc in (slurm, local):
                if proc.poll() is None:
                    # SIGINT first: Snakemake then cancels the run's Slurm jobs
                    os.killpg(proc.pid, signal.SIGINT)
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        kill_tree(proc)
    return SimpleNamespace(
        config=config, local_dir=local_dir, slurm_dir=slurm_dir, run_dir=cancelled_dir,
        local_rc=local.returncode, local_output=local_log.read_text(),
        slurm_rc=slurm.returncode, slurm_output=slurm_log.read_text(),
        slurm_seconds=slurm_seconds, total_seconds=time.monotonic() - started, since=since, cancel=cancel,
        env=env,
    )


@pytest.fixture(scope="module")
def slurm_jobs(cluster, runs) -> SimpleNamespace:
    """The Slurm run's jobs: sacct rows, Slurm logs and the (rule, wildcards) each COMPLETED job executed."""
    assert runs.local_rc == 0, f"the local run failed:\n{runs.local_output[-6000:]}"
    assert runs.slurm_rc == 0, f"the Slurm run failed:\n{runs.slurm_output[-8000:]}"
    name = re.search(r"SLURM run ID: (\S+)", runs.slurm_output)[1]
    submitted = _submissions(runs.slurm_output)
    jobs = _sacct_jobs(cluster, name, runs.since, set(submitted))
    executed: dict[str, list[tuple[str, str]]] = {}
    for job_id, log in submitted.items():
        # inside a Slurm job, the job step's Snakemake runs each job as a "localrule"
        executed[job_id] = _executed_jobs(log.read_text(), local_only=True) if log.is_file() else []
    return SimpleNamespace(name=name, submitted=submitted, sacct=jobs, executed=executed)


# ------------------------------------------------------------------------------------------------ the tests


def test_the_cluster_is_up(cluster):
    for daemon in DAEMONS:
        assert re.search(rf"^{daemon}\s+running", cluster.status, re.M), cluster.status
    assert re.search(r"^node\s+localhost (idle|mixed|allocated) .*gres=gpu:fake:\d", cluster.status, re.M), \
        cluster.status


def test_the_run_used_the_slurm_profile_and_the_workflow_profile(runs):
    out = runs.slurm_output
    assert runs.slurm_rc == 0, f"the Slurm run failed:\n{out[-8000:]}"
    using = re.search(r"^Using profiles? (.*) for setting default command line arguments", out, re.M)
    assert using, "Snakemake did not report its profiles"
    assert str(SLURM_PROFILE) in using[1] and str(TEST_PROFILE) in using[1], using[0]
    # profiles/default, beside the Snakefile, is found although the run starts in another folder
    assert f"workflow specific profile {WORKFLOW_PROFILE_DIR}" in using[1], using[0]
    assert "SLURM run ID: robustft_" in out  # slurm-jobname-prefix of slurm/profile.yaml


def test_every_non_local_job_ran_in_a_completed_slurm_job(runs, slurm_jobs):
    local_jobs = _executed_jobs(runs.local_output, local_only=True)
    assert local_jobs, f"no jobs found in the local run's output:\n{runs.local_output[-3000:]}"
    expected = collections.Counter(job for job in local_jobs if job[0] not in LOCAL_RULES)
    # the Slurm run submitted exactly the jobs sacct lists for it
    assert set(slurm_jobs.sacct) == set(slurm_jobs.submitted), (
        f"sacct jobs {sorted(slurm_jobs.sacct)} != submitted {sorted(slurm_jobs.submitted)}")
    completed = {j for j, row in slurm_jobs.sacct.items() if row["State"] == "COMPLETED"}
    others = {j: row["State"] for j, row in slurm_jobs.sacct.items() if j not in completed}
    assert set(others) == {runs.cancel.job}, f"jobs that did not complete: {others} (cancelled: {runs.cancel.job})"
    # the local run stops at the summary; the Slurm run goes on to the report (per-class damage, the analyses)
    ran = collections.Counter(job for j in completed for job in slurm_jobs.executed[j]
                              if job[0] not in AFTER_SUMMARY_RULES)
    assert ran == expected, (
        f"jobs of the local run that no COMPLETED Slurm job ran: {sorted(expected - ran)}; "
        f"jobs Slurm ran that the local run did not, or twice: {sorted(ran - expected)}")
    # each Slurm job's comment names its rule (rule_<rule>_wildcards_..., rule_<group>_<rule> for group jobs)
    for job_id in completed:
        rules = {rule for rule, _ in slurm_jobs.executed[job_id]}
        comment = slurm_jobs.sacct[job_id]["Comment"]
        assert len(rules) == 1, (job_id, rules)
        rule = next(iter(rules))
        assert re.fullmatch(rf"rule_({rule}(_wildcards_.+)?|\w+_{rule})", comment), (job_id, rule, comment)
        assert slurm_jobs.sacct[job_id]["JobName"] == slurm_jobs.name


def test_local_rules_ran_outside_slurm(runs, slurm_jobs):
    in_slurm = {rule for jobs in slurm_jobs.executed.values() for rule, _ in jobs}
    assert not in_slurm & LOCAL_RULES, f"local rules ran in Slurm jobs: {in_slurm & LOCAL_RULES}"
    main = re.findall(r"^\[[^\]]+\]\nlocalrule (\w+):", runs.slurm_output, re.M)
    assert LOCAL_RULES <= set(main), f"local rules run by the main Snakemake: {main}"
    assert (runs.slurm_dir / "results" / "report" / "index.html").is_file()


def test_gpu_rules_got_a_gpu_on_the_gpu_partition(runs, slurm_jobs):
    for job_id, jobs in slurm_jobs.executed.items():
        row = slurm_jobs.sacct[job_id]
        rules = {rule for rule, _ in jobs}
        gpus = re.search(r"gres/gpu(?::[^=,]*)?=(\d+)", row["AllocTRES"])
        if rules & GPU_RULES:
            expected = DDP_RANKS if any(_runs_finetune([job], "full_ft", DDP_VARIANT, 0) for job in jobs) else 1
            assert gpus and int(gpus[1]) == expected, f"job {job_id} ({rules}) got {row['AllocTRES']}: {expected} GPUs?"
            assert row["Partition"] == "gpu", f"job {job_id} ({rules}) ran on partition {row['Partition']}"
        elif row["State"] == "COMPLETED":
            assert not gpus, f"job {job_id} ({rules}) got a GPU: {row['AllocTRES']}"
            assert row["Partition"] == "debug", f"job {job_id} ({rules}) ran on partition {row['Partition']}"


def test_fake_gpu_jobs_see_cuda_visible_devices_and_train_on_cpu(runs):
    # the test node's GPUs are names only: Slurm sets CUDA_VISIBLE_DEVICES, torch finds no CUDA device, and
    # `device: auto` falls back to the CPU
    assert runs.cancel.envs, f"no process of Slurm job {runs.cancel.job} found"
    visible = {env.get("CUDA_VISIBLE_DEVICES") for env in runs.cancel.envs}
    assert visible - {None, ""}, f"CUDA_VISIBLE_DEVICES in the job's processes: {visible}"
    for method in ("zeroshot", "full_ft"):
        record = json.loads((run_dir(runs.slurm_dir, runs.config, method, "default") / "run.json").read_text())
        assert record["device"] == "cpu", record["device"]


def test_jobs_read_the_checkpoint_the_weights_rule_recorded_with_the_hub_offline(runs, slurm_jobs):
    import h5py

    records = list((runs.slurm_dir / "results" / "weights").glob("*.json"))
    assert len(records) == 1, records
    record = json.loads(records[0].read_text())
    assert Path(record["path"]).is_file() and record["sha256"]
    for method in ("zeroshot", "full_ft"):
        run = json.loads((run_dir(runs.slurm_dir, runs.config, method, "default") / "run.json").read_text())
        assert run["backbone"]["weights_sha256"] == record["sha256"], method
    features = sorted((runs.slurm_dir / "results" / "features").rglob("*.h5"))
    assert features
    for path in features:
        with h5py.File(path, "r") as handle:
            assert handle.attrs["weights_sha256"] == record["sha256"], path
    # the Slurm job's processes (the cancelled fine-tuning) ran with the model hub switched offline
    assert runs.cancel.envs and all(env.get("HF_HUB_OFFLINE") == "1" for env in runs.cancel.envs), \
        [env.get("HF_HUB_OFFLINE") for env in runs.cancel.envs]


def _runs_finetune(jobs, method: str, variant: str, seed: int) -> bool:
    """Whether a Slurm job's executed (rule, wildcards) include the fine-tuning of this run (of the one study)."""
    return any(rule == "finetune" and wildcards.endswith(f"method={method}, variant={variant}, seed={seed}")
               for rule, wildcards in jobs)


def test_cancelled_fine_tuning_was_resubmitted_and_resumed_from_its_checkpoint(runs, slurm_jobs):
    cancel = runs.cancel
    assert cancel.job, f"the full_ft job never wrote a resume checkpoint:\n{runs.slurm_output[-6000:]}"
    assert cancel.state == "RUNNING", f"job {cancel.job} was {cancel.state} when cancelled"
    assert slurm_jobs.sacct[cancel.job]["State"].startswith("CANCELLED"), slurm_jobs.sacct[cancel.job]
    # Snakemake saw the failure and, through the profile's `retries`, submitted the job again
    assert re.search(rf"SLURM-job '{cancel.job}' failed, SLURM status is: 'CANCELLED'", runs.slurm_output)
    finetune_jobs = [j for j, jobs in slurm_jobs.executed.items()
                     if _runs_finetune(jobs, "full_ft", "default", 0)]
    assert len(finetune_jobs) == 2 and cancel.job in finetune_jobs, finetune_jobs
    (retry,) = set(finetune_jobs) - {cancel.job}
    assert slurm_jobs.sacct[retry]["State"] == "COMPLETED"
    assert int(retry) > int(cancel.job)
    record = json.loads((runs.run_dir / "run.json").read_text())
    local_record = json.loads((run_dir(runs.local_dir, runs.config, "full_ft", "default") / "run.json").read_text())
    assert record["resumed_at_step"] and record["resumed_at_step"] > 0, record["resumed_at_step"]
    assert record["resumed_at_step"] < record["steps"] == local_record["steps"]
    assert local_record["resumed_at_step"] is None
    assert not runs.run_dir.with_name(runs.run_dir.name + ".resume").exists(), "resume checkpoint left behind"


def _tensors_differ(a: Path, b: Path) -> list[str]:
    import torch
    from robustft.training.checkpoint import load_safetensors

    x, y = load_safetensors(a), load_safetensors(b)
    assert x.keys() == y.keys(), f"{a} and {b} hold different tensors"
    return [k for k in x if not torch.equal(x[k], y[k])]


def test_resumed_fine_tuning_equals_an_uninterrupted_one_on_the_same_inputs(runs, slurm_jobs, tmp_path):
    """The cancelled-and-resumed job's weights, bit for bit those of an uninterrupted fine-tuning of its inputs."""
    method, variant, seed = CANCELLED_RUN
    (retry,) = [j for j, jobs in slurm_jobs.executed.items() if j != runs.cancel.job
                and _runs_finetune(jobs, method, variant, seed)]
    out = tmp_path / "replay" / f"seed{seed}"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "slurm" / "replay_finetune.py"), str(runs.slurm_dir),
                           method, variant, str(seed), str(out)],
                          capture_output=True, text=True, timeout=600, env=runs.env, cwd=str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    replay = json.loads((out / "run.json").read_text())
    assert replay["resumed_at_step"] is None and replay["steps"] == json.loads(
        (runs.run_dir / "run.json").read_text())["steps"]
    different = _tensors_differ(runs.run_dir / "model.safetensors", out / "model.safetensors")
    assert not different, f"the resumed run's weights differ from an uninterrupted run's: {different[:5]}"


def test_reference_head_and_fine_tuned_weights_equal_the_local_run(runs, slurm_jobs):
    (head,) = [p.relative_to(runs.local_dir) for p in runs.local_dir.glob("results/*/*/reference/head.safetensors")]
    # Equal although the jobs get different cores (set-threads under Slurm): torch runs compute.cpu_threads threads
    # in every job, and CPU results depend on the thread count.
    different = _tensors_differ(runs.slurm_dir / head, runs.local_dir / head)
    assert not different, f"the reference head differs from the local run's: {different[:5]}"
    for method, variant in (("full_ft", "default"), ("full_ft", DDP_VARIANT)):
        weights = run_dir(".", runs.config, method, variant) / "model.safetensors"
        different = _tensors_differ(runs.slurm_dir / weights, runs.local_dir / weights)
        assert not different, f"{method}/{variant}: tensors differ from the local run's: {different[:5]}"


def test_a_two_rank_fine_tuning_ran_in_one_slurm_job_with_two_gpus(runs, slurm_jobs):
    """One Slurm job (--gpus=2, one node) ran the 2-rank variant: its ranks trained (rank 0 logged), it completed."""
    (job,) = [j for j, jobs in slurm_jobs.executed.items() if _runs_finetune(jobs, "full_ft", DDP_VARIANT, 0)]
    row = slurm_jobs.sacct[job]
    assert row["State"] == "COMPLETED", row
    assert re.search(rf"gres/gpu(?::[^=,]*)?={DDP_RANKS}\b", row["AllocTRES"]), row["AllocTRES"]
    assert "node=1" in row["AllocTRES"], row["AllocTRES"]
    record = json.loads((run_dir(runs.slurm_dir, runs.config, "full_ft", DDP_VARIANT) / "run.json").read_text())
    # finetune_run refuses to run a variant of k devices in any other number of ranks
    assert record["hyperparameters"]["devices"] == DDP_RANKS and record["device"] == "cpu", record
    assert record["steps"] > 0
    (log,) = [p for p in (runs.slurm_dir / "results" / "logs" / "finetune").rglob("seed0.log") if DDP_VARIANT in p.parts]
    assert re.search(r"\[rank 0\] .*epoch", log.read_text()), f"no rank-0 progress line in {log}"


def test_summary_equals_the_local_run(runs, slurm_jobs):
    ours, local = read_summary(runs.slurm_dir), read_summary(runs.local_dir)
    assert len(ours) > 0
    problem = summaries_equal_message(ours, local)
    assert problem is None, f"the Slurm run's summary differs from the local run's: {problem}"


# ------------------------------------------------------------------------------------------------ dry run


def _tree_snapshot(root: Path):
    if not root.exists():
        return None
    return {(str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_dry_run_prints_the_resources_each_rule_would_request():
    """``snakemake --profile slurm -n`` from the repository root: no cluster needed, nothing written to results/."""
    results = REPO / "results"
    before = _tree_snapshot(results)
    # --forceall: list every job whatever the state of the checkout's results/
    proc = subprocess.run([str(SNAKEMAKE), "--profile", "slurm", "-n", "--forceall"], capture_output=True,
                          text=True, timeout=300, cwd=str(REPO), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert _tree_snapshot(results) == before, "the dry run wrote under results/"
    assert "This was a dry-run" in out
    requested: dict[str, dict[str, str]] = {}
    # jobs of a group job are printed indented under "Group job <group> (jobs in lexicogr. order):"
    for match in re.finditer(r"^( *)(?:local)?rule (\w+):\n((?:\1    .*\n)*)", out, re.M):
        line = re.search(r"^ *resources: (.*)$", match[3], re.M)
        assert line, f"no resources printed for rule {match[2]}"
        requested.setdefault(match[2], dict(item.split("=", 1) for item in line[1].split(", ")))
    for group in set(yaml.safe_load((SLURM_PROFILE / "profile.yaml").read_text())["groups"].values()):
        assert f"Group job {group} " in out, f"no group job {group} in the dry run"
    profile = yaml.safe_load((SLURM_PROFILE / "profile.yaml").read_text())
    assert {"finetune", "features", "sweep", "manifest", "summary"} <= set(requested), sorted(requested)
    finetune = requested["finetune"]
    assert finetune["gpu"] == "1" and finetune["slurm_partition"] == "gpu", finetune
    assert int(finetune["mem_mb"]) > 0 and int(finetune["runtime"]) > 0, finetune
    # every rule asks for what slurm/profile.yaml sets for it (set-resources over default-resources)
    for rule, res in requested.items():
        wanted = {**profile["default-resources"], **profile["set-resources"].get(rule, {})}
        for key, value in wanted.items():
            assert res.get(key) == str(value), f"{rule}: {key}={res.get(key)!r}, slurm/profile.yaml says {value!r}"
    # a rule that asks for a GPU goes to the GPU partition (a `use rule ... as` copy gets none of its original's
    # set-resources: the soups' rules once asked for --gpus=1 on the CPU partition)
    assert {"soup", "soup_sweep"} <= set(requested), sorted(requested)
    for rule, res in requested.items():
        if int(res.get("gpu", "0")) > 0:
            assert res.get("slurm_partition") == "gpu", f"{rule} asks for a GPU on partition {res.get('slurm_partition')}"


# ------------------------------------------------------------------------------------------------ last: stop


def test_stop_leaves_none_of_the_daemons_it_started(cluster):
    """Runs last in this module (the fixture's finalizer repeats the check whatever ran)."""
    if not cluster.owned:
        pytest.skip(f"the cluster in {SLURM_TEST_DIR} was running before the tests: left running")
    _stop_and_check(cluster)
