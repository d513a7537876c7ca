#!/usr/bin/env bash
# End-to-end test of the SLURM profile: runs the toy workflow (tests/slurm/toy) on the
# test cluster of cluster.sh with the real profile, exactly as a user would
# (`snakemake --cores all --profile slurm` from the repository root, profiles/default
# applied), plus the test cluster's overrides (tests/slurm/test_profile).
#
#     bash tests/slurm/cluster.sh start
#     bash tests/slurm/run_toy.sh [--quick]
#     bash tests/slurm/cluster.sh stop
#
# Scenarios (each checks its jobs against sacct, or squeue without accounting):
#   basic    4 sweep jobs -> 2 group jobs of 2 (one fake GPU each, running at the same
#            time), 1 reference job, 1 local report job. Every non-local job ran as a
#            Slurm job (the job ID it wrote is in sacct, COMPLETED, under this run's job
#            name and the right rule); the local one ran outside Slurm.
#   requeue  `scontrol requeue` of the running sweep job: Snakemake waits for it, the
#            job runs again under the same Slurm ID, the workflow succeeds.
#            (The test cluster has JobRequeue=0, so this also shows that the profile's
#            slurm-requeue reaches sbatch.)
#   cancel   `scancel` of the running sweep job: Snakemake sees it fail and, through
#            the profile's `retries`, submits it again under a new Slurm ID. Runs with
#            --slurm-status-command squeue: with sacct (the default) plugin 2.8.0 never
#            notices the cancellation, because sacct reports the state as
#            "CANCELLED by <uid>", which the plugin does not match, so Snakemake waits
#            for the job forever (observed; this scenario then times out).
# --quick runs `basic` only. Work folders: $SLURM_TEST_DIR/toy/<scenario>.
# Environment: SLURM_TEST_DIR (as cluster.sh), SNAKEMAKE (default .venv/bin/snakemake),
# TOY_TIMEOUT (seconds per Snakemake run, default 300).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
D=${SLURM_TEST_DIR:-/tmp/robustft-slurm}
SNAKEMAKE=${SNAKEMAKE:-$REPO/.venv/bin/snakemake}
TIMEOUT=${TOY_TIMEOUT:-300}
QUICK=0
[[ ${1:-} == --quick ]] && QUICK=1

eval "$(SLURM_TEST_DIR=$D bash "$HERE/cluster.sh" env)"
if ! SLURM_TEST_DIR=$D bash "$HERE/cluster.sh" status >/dev/null 2>&1; then
    echo "run_toy.sh: the test cluster is not running: bash tests/slurm/cluster.sh start" >&2
    exit 1
fi

STATUS_ARGS=()
# (not `scontrol ... | grep -q`: with pipefail, grep's early exit fails the pipe)
if [[ $(scontrol show config 2>/dev/null) =~ AccountingStorageType\ *=\ *accounting_storage/none ]]; then
    ACCOUNTING=0
    # without slurmdbd, sacct fails and the plugin would poll it forever
    STATUS_ARGS=(--slurm-status-command squeue)
else
    ACCOUNTING=1
fi

PASSED=0
FAILED=0
W=""   # work folder of the current scenario
LOG="" # its Snakemake log

ok() {
    echo "ok    $*"
    PASSED=$((PASSED + 1))
}
fail() {
    echo "FAIL  $*"
    FAILED=$((FAILED + 1))
    if [[ -n $LOG && -f $LOG ]]; then
        echo "----- $LOG (last 40 lines) -----"
        tail -n 40 "$LOG"
        echo "----- Slurm jobs of this run -----"
        run_jobs || true
    fi
}

new_workdir() {
    W="$D/toy/$1"
    LOG="$W.snakemake.log"
    rm -rf "$W" "$LOG"
    mkdir -p "$W"
}

# snakemake ARGS...: the toy workflow, from the repository root as users run it
snakemake_toy() {
    (cd "$REPO" && timeout -k 20 "$TIMEOUT" "$SNAKEMAKE" --snakefile "$HERE/toy/Snakefile" \
        --directory "$W" --cores all --profile slurm --profile tests/slurm/test_profile \
        "${STATUS_ARGS[@]}" "$@")
}

# the Slurm job name of the run in $LOG (the plugin logs "SLURM run ID: <name>")
run_name() { sed -n 's/.*SLURM run ID: \([A-Za-z0-9_-]*\).*/\1/p' "$LOG" | head -n 1; }

# run_jobs: "id|state|comment|tres|start|end" for each Slurm job of the run
run_jobs() {
    local name
    name=$(run_name)
    [[ -n $name ]] || return 1
    if ((ACCOUNTING)); then
        sacct -X -P -n --name "$name" -S "$(date -d '-1 day' +%Y-%m-%dT%H:%M:%S)" \
            --format=JobIdRaw,State,Comment,AllocTRES,Start,End
    else
        # squeue keeps finished jobs for MinJobAge (300 s); scontrol has the details
        # (TresPerJob: the --gpus request, e.g. gres:gpu:1)
        local id
        for id in $(squeue --states=all -h --name "$name" -o %i); do
            scontrol show job -o "$id" | tr ' ' '\n' | awk -F= -v id="$id" '
                { k = $1; sub(/^[^=]*=/, ""); f[k] = $0 }
                END { print id "|" f["JobState"] "|" f["Comment"] "|" f["TresPerJob"] "|" f["StartTime"] "|" f["EndTime"] }'
        done
    fi
}

# job IDs written by the jobs: "job=<id>" in a file
job_of() { sed -n 's/.*job=\([0-9a-z]*\).*/\1/p' "$1" | head -n 1; }

check_basic() {
    new_workdir basic
    if ! snakemake_toy --config sweeps=4 >"$LOG" 2>&1; then
        fail "basic: snakemake failed or timed out"
        return
    fi
    ok "basic: snakemake finished"
    local table
    table=$(run_jobs)
    local i id ids=() sweep_ids=() errors=()
    for i in 0 1 2 3; do
        id=$(job_of "$W/results/sweep/$i.txt")
        sweep_ids+=("$id")
        ids+=("$id")
    done
    local ref_id report_id
    ref_id=$(sed -n 's/^reference job=//p' "$W/results/reference.txt")
    report_id=$(sed -n 's/^report job=//p' "$W/results/report.txt")
    ids+=("$ref_id")
    # every non-local job: a Slurm job of this run, COMPLETED, of the right rule
    for id in "${sweep_ids[@]}"; do
        # sacct: gres/gpu=1 in AllocTRES; squeue: gres:gpu:1
        grep -Eq "^$id\|COMPLETED\|rule_sweeps_sweep\|.*gpu[^|,]*[=:]1" <<<"$table" ||
            errors+=("sweep job $id: not a COMPLETED group job with a GPU")
    done
    grep -q "^$ref_id|COMPLETED|rule_reference|" <<<"$table" ||
        errors+=("reference job $ref_id: not a COMPLETED Slurm job")
    [[ $report_id == none ]] || errors+=("report (a local rule) ran in Slurm job $report_id")
    # ... and no other Slurm jobs
    local expected actual
    expected=$(printf '%s\n' "${ids[@]}" | sort -u | tr '\n' ' ')
    actual=$(cut -d'|' -f1 <<<"$table" | sort -u | tr '\n' ' ')
    [[ $expected == "$actual" ]] || errors+=("Slurm jobs of the run: $actual, expected $expected")
    # 4 sweeps, group-components 2 -> 2 group jobs (one GPU each), at the same time:
    # the workstation's limit of one GPU job (profiles/default) does not serialize them
    local groups s1 e1 s2 e2
    mapfile -t groups < <(printf '%s\n' "${sweep_ids[@]}" | sort -u)
    if ((${#groups[@]} != 2)); then
        errors+=("${#groups[@]} group jobs for 4 sweeps, expected 2")
    else
        IFS='|' read -r _ _ _ _ s1 e1 < <(grep "^${groups[0]}|" <<<"$table")
        IFS='|' read -r _ _ _ _ s2 e2 < <(grep "^${groups[1]}|" <<<"$table")
        [[ $s2 < $e1 && $s1 < $e2 ]] ||
            errors+=("the two GPU group jobs did not overlap ($s1..$e1, $s2..$e2)")
    fi
    [[ -n $(find "$W/results/logs/slurm" -name '*.log' 2>/dev/null) ]] ||
        errors+=("no Slurm logs under results/logs/slurm")
    if ((${#errors[@]})); then
        fail "basic: $(printf '%s; ' "${errors[@]}")"
    else
        ok "basic: 4 sweeps in group jobs ${groups[*]} (in parallel, 1 GPU each), reference in job $ref_id, report locally"
    fi
}

# start_slow [ARGS]: the toy with one slow sweep job, in the background; sets PID, JOB
start_slow() {
    snakemake_toy --config sweeps=1 slow=0 slow_sleep=12 "$@" >"$LOG" 2>&1 &
    PID=$!
    local i
    for ((i = 0; i < 240; i++)); do
        [[ -s $W/results/attempts/0.txt ]] && break
        sleep 0.5
    done
    JOB=$(job_of "$W/results/attempts/0.txt" 2>/dev/null || true)
    [[ -n $JOB && $JOB != none ]]
}

check_requeue() {
    new_workdir requeue
    if ! start_slow; then
        fail "requeue: the slow sweep job did not start"
        kill "$PID" 2>/dev/null || true
        return
    fi
    if ! scontrol requeue "$JOB" 2>"$W.scontrol.err"; then
        fail "requeue: scontrol requeue $JOB: $(cat "$W.scontrol.err")"
        kill "$PID" 2>/dev/null || true
        return
    fi
    if ! wait "$PID"; then
        fail "requeue: snakemake failed after the requeue of job $JOB"
        return
    fi
    local runs states
    runs=$(grep -c "job=$JOB " "$W/results/attempts/0.txt" || true)
    if ((ACCOUNTING)); then
        states=$(sacct -D -X -P -n -j "$JOB" --format=State | tr '\n' ' ')
    else
        states="(no accounting)"
    fi
    if ((runs == 2)) && [[ -f $W/results/report.txt ]] &&
        { ((!ACCOUNTING)) || [[ $states == "REQUEUED COMPLETED " ]]; }; then
        ok "requeue: job $JOB requeued while running, ran twice (sacct: $states), workflow succeeded"
    else
        fail "requeue: job $JOB ran $runs times (expected 2), sacct states: $states"
    fi
}

check_cancel() {
    new_workdir cancel
    if ! start_slow --slurm-status-command squeue; then
        fail "cancel: the slow sweep job did not start"
        kill "$PID" 2>/dev/null || true
        return
    fi
    scancel "$JOB"
    if ! wait "$PID"; then
        fail "cancel: snakemake failed after the cancellation of job $JOB (retries: 1 expected a resubmission)"
        return
    fi
    local first second state1 state2
    first=$(sed -n '1s/.*job=\([0-9]*\).*/\1/p' "$W/results/attempts/0.txt")
    second=$(sed -n '2s/.*job=\([0-9]*\).*/\1/p' "$W/results/attempts/0.txt")
    if ((ACCOUNTING)); then
        state1=$(sacct -X -P -n -j "$first" --format=State)
        state2=$(sacct -X -P -n -j "$second" --format=State 2>/dev/null || true)
    else
        state1="CANCELLED" state2="COMPLETED" # squeue forgets; the IDs below still tell
    fi
    if [[ -n $second && $first != "$second" && $state1 == CANCELLED* && $state2 == COMPLETED ]]; then
        ok "cancel: job $first cancelled while running, resubmitted as job $second (retries), workflow succeeded"
    else
        fail "cancel: first job $first ($state1), second job ${second:-none} ($state2)"
    fi
}

check_basic
if ((!QUICK)); then
    check_requeue
    check_cancel
fi
echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
