"""Cost of gradient accumulation and of data-parallel ranks at the same global batch (issue #19).

Four ``finetune_run`` configurations of the same run (same model, same synthetic in-memory data, same global batch
``--batch-size``, same steps), timed end to end and per step:

* one process, the whole batch in one forward/backward pass (the baseline);
* one process, ``micro_batch_size`` = batch / ``--micro-splits`` (gradient accumulation);
* ``--ranks`` processes (``finetune_ranks``: gloo on CPU, NCCL with one GPU each on CUDA), each with
  ``--threads / ranks`` torch threads on CPU, so that all of them together use the baseline's threads;
* the same ranks with accumulation.

"step s" is the median wall time of one optimizer step (from ``train_log.parquet``: the step's examples /
``samples_per_s``, reading included), "run s" the whole ``finetune_run`` / ``finetune_ranks`` call (process start,
model build, one validation pass, checkpoint writes), "CPU s" the CPU time of the whole call over every process
(on a busy machine the fairer figure: more processes get a larger share of the cores). Overhead % = (config / baseline - 1) x 100 on the median of
``--repeats`` interleaved runs.

Example: ``python bench/bench_parallel.py --image-size 96 --batch-size 32 --steps 12 --repeats 3 --threads 2``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from common import (  # noqa: E402
    add_backbone_args,
    add_common_args,
    backbone_spec_from_args,
    finish_backbone_args,
    print_machine,
    table,
    timed,
    wait_for_quiet,
    write_json,
)

NUM_CLASSES = 7


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (the spawned ranks)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (examples per optimizer step)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per timed run (one epoch)")
    p.add_argument("--micro-splits", type=int, default=4, help="micro-batches per step (per rank) with accumulation")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    add_backbone_args(p, default_size=96)
    add_common_args(p)
    args = p.parse_args(argv)
    finish_backbone_args(args, 96)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from robustft.backbones import build_backbone
    from robustft.training.context import Split
    from robustft.training.run import RunData, RunSpec, finetune_ranks, read_train_log

    tmp_ctx = tempfile.TemporaryDirectory(prefix="robustft-bench-parallel-")
    tmp = Path(tmp_ctx.name)
    spec = backbone_spec_from_args(args, tmp)
    backbone = build_backbone(spec)
    size = backbone.preprocessing.image_size
    n = args.steps * args.batch_size
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    val = torch.randint(0, 256, (NUM_CLASSES, size, size, 3), dtype=torch.uint8, generator=gen)
    data = RunData(class_names=[f"c{i}" for i in range(NUM_CLASSES)], train=Split(labels, pixels),
                   val=Split(torch.arange(NUM_CLASSES), val))
    head = {"head.weight": torch.randn(NUM_CLASSES, backbone.feature_dim, generator=gen) * 0.01,
            "head.bias": torch.zeros(NUM_CLASSES)}
    training = {"epochs": 1, "batch_size": args.batch_size, "lr": 1e-4, "warmup_steps": 2, "select": "last",
                "checkpoint_every": 0, "eval_batch_size": 64}
    per_rank = args.batch_size // args.ranks
    configs = {
        "1 process, whole batch": (1, None),
        f"1 process, {args.micro_splits} micro-batches of {args.batch_size // args.micro_splits}":
            (1, args.batch_size // args.micro_splits),
        f"{args.ranks} ranks x {per_rank}": (args.ranks, None),
        f"{args.ranks} ranks x {args.micro_splits} micro-batches of {per_rank // args.micro_splits}":
            (args.ranks, per_rank // args.micro_splits),
    }
    machine = print_machine(f"bench_parallel: batch {args.batch_size}, {args.steps} steps, {size} px, "
                            f"{args.threads} threads in all, device {args.device}")
    wait_for_quiet(args.quiet_load, args.wait_quiet)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    for repeat in range(args.repeats):
        for name, (ranks, micro) in configs.items():
            run_dir = tmp / f"r{repeat}" / name.replace(" ", "_")
            rs = RunSpec(method="full_ft", seed=0,
                         training={**training, "devices": ranks, "micro_batch_size": micro, "device": args.device})
            threads = max(1, args.threads // ranks) if ranks > 1 else None
            if ranks == 1:
                torch.set_num_threads(args.threads)
            before = cpu_seconds()
            seconds, _ = timed(lambda: finetune_ranks(rs, data, backbone=spec, reference_head=head, run_dir=run_dir,
                                                      device=args.device, threads=threads))
            log = read_train_log(run_dir)
            step = statistics.median((args.batch_size / log["samples_per_s"]).tolist()[1:])  # first: warm-up
            runs[name].append((seconds, step, cpu_seconds() - before))
    base_run = statistics.median(r[0] for r in runs[next(iter(configs))])
    base_step = statistics.median(r[1] for r in runs[next(iter(configs))])
    base_cpu = statistics.median(r[2] for r in runs[next(iter(configs))])
    rows = []
    for name, values in runs.items():
        run_s, step_s = statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
        cpu_s = statistics.median(v[2] for v in values)
        rows.append({"configuration": name, "step s": round(step_s, 4),
                     "step overhead %": round((step_s / base_step - 1) * 100, 1), "run s": round(run_s, 2),
                     "run overhead %": round((run_s / base_run - 1) * 100, 1), "CPU s (all ranks)": round(cpu_s, 1),
                     "CPU overhead %": round((cpu_s / base_cpu - 1) * 100, 1)})
    table(rows, title=f"same global batch {args.batch_size}, median of {args.repeats}")
    write_json(args.json, {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    tmp_ctx.cleanup()


if __name__ == "__main__":
    main()
