"""Scale: peak resident memory and throughput of every stage at two dataset sizes, N and 8N (issue #15 item 4).

Generates a synthetic ImageFolder (``root/<domain>/<class>/<image>.jpg``, many classes, an ID domain ``id`` with 80 %
of the images and an OOD domain ``ood``) at N and at 8N images, then runs at each size, through the library's stage
functions (the same calls the workflow scripts make), each stage in its own child process:

* manifest (``manifest_stage``: scan, check every JPEG, split, label),
* pixel cache (``pixel_stage``) of ``id_train``, ``id_val``, ``id_test``, ``ood_test``,
* feature extraction (``features_stage``) of the same four caches,
* the reference head (``reference_stage``: linear probe on the ID features, read in chunks),
* one fine-tuning epoch (``finetune_stage``: full_ft, streaming from the pixel cache, per-epoch ID validation),
* the WiSE-FT sweep (``sweep_stage``) of that run over the ID val/test and OOD test splits.

A child runs every cache of its stage in sequence (a pipeline job does one), so its peak is the largest of them
plus whatever they leave behind. Peak memory is the child's own high-water mark (``VmHWM`` of /proc/self/status,
the same as ``getrusage(RUSAGE_SELF).ru_maxrss``): Python, torch and the model included. Throughput is images
(or training samples) per second of the stage's call, process start and imports excluded.

Then streaming against in-memory training on the same data (the size-N ID train split): ``finetune_run`` with the
split read from the pixel cache by rows (what ``finetune_stage`` does) against the same split read whole into a
tensor first, same trainer, model and seed; runs alternate, each in its own child (so each also reports its peak).

Targets (issue #15): every stage's peak at 8N within 15 % of its peak at N; streaming >= 90 % of in-memory
throughput on CPU. The data, caches and runs go to a temporary folder (``--workdir`` to keep them).

Example: ``python bench/bench_scale.py --n 8000`` (about a minute per stage at N on an idle 2-core machine);
``--n 2000`` for a loaded one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (  # noqa: E402
    REPO,
    add_common_args,
    loadavg,
    print_machine,
    table,
    wait_for_quiet,
    work_directory,
    write_json,
)

DOMAINS = ("id", "ood")
ID_SHARE = 0.8
CACHES = (("id", "train"), ("id", "val"), ("id", "test"), ("ood", "test"))
EVAL = ("id_val", "id_test", "ood_test")
SPLIT = {"val_fraction": 0.15, "test_fraction": 0.25, "seed": 0}
STAGES = ("manifest", "pixels", "features", "reference", "finetune", "sweep")
RESULT = "BENCH_SCALE_RESULT "
#: The reference probe's grid, shorter than the pipeline's default (5 strengths x 200 L-BFGS iterations): the head
#: is only the fine-tuning's starting point here; its memory is measured all the same.
REFERENCE_L2_GRID, REFERENCE_MAX_ITER = [1e-3, 1e-1], 50
SOURCE_PX = 128


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8000, help="images of the small size (the large one has 8x)")
    p.add_argument("--factor", type=int, default=8)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--image-size", type=int, default=96, help="EfficientNet-Lite0 input resolution (demo: 96)")
    p.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch (the demo's)")
    p.add_argument("--eval-batch-size", type=int, default=256, help="extraction and sweep batch (eval.batch_size)")
    p.add_argument("--alphas", default="0,0.5,1", help="sweep alphas (comma-separated)")
    p.add_argument("--compare-repeats", type=int, default=2,
                   help="streaming vs in-memory runs of each kind (alternating, ABBA...)")
    p.add_argument("--stages", default=",".join(STAGES), help="stages to run (all need the ones before)")
    p.add_argument("--workdir", type=Path, default=None, help="keep data and caches here instead of a temp folder")
    p.add_argument("--freeze-min-pixels", type=int, default=None,
                   help="CPU extraction and sweep: freeze the encoder graph from this many input pixels per pass "
                        "(default: the library's FREEZE_MIN_PIXELS; 0: always, so that both sizes take one path)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size-dir", type=Path, default=None, help=argparse.SUPPRESS)
    add_common_args(p)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- the data
def jpeg_pool(size: int = 64, seed: int = 0) -> list[bytes]:
    """``size`` JPEGs (128 px) of seeded smooth colour noise. Which one an image gets does not depend on its class:
    the labels carry no signal, so the reference head stays small and fine-tuning's losses stay ordinary (a
    perfectly separable set made the probe's weights huge and full fine-tuning diverge)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(size):
        coarse = rng.normal(128, 50, (8, 8, 3))
        field = np.kron(coarse, np.ones((SOURCE_PX // 8, SOURCE_PX // 8, 1)))
        img = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=85)
        pool.append(buf.getvalue())
    return pool


def generate(root: Path, n: int, classes: int) -> dict[str, int]:
    """``n`` images over ``classes`` classes: ``ID_SHARE`` of them in domain ``id``, the rest in ``ood``."""
    pool = jpeg_pool(classes)
    per_domain = {"id": round(n * ID_SHARE / classes), "ood": round(n * (1 - ID_SHARE) / classes)}
    written = {}
    for domain, per_class in per_domain.items():
        for c in range(classes):
            folder = root / domain / f"class{c:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (folder / f"{domain}{c:04d}_{i:05d}.jpg").write_bytes(pool[(7 * c + i) % len(pool)])
        written[domain] = per_class * classes
    return written


# ---------------------------------------------------------------------------------------------------- the stages
def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Layout:
    """Where one size's data, caches and run lie (the pipeline's names, flattened)."""

    def __init__(self, size_dir: Path) -> None:
        self.dir = size_dir
        self.root = size_dir / "data"
        self.manifest = size_dir / "manifest.parquet"
        self.head = size_dir / "reference" / "head.safetensors"
        self.head_json = size_dir / "reference" / "reference.json"
        self.run_json = size_dir / "runs" / "full_ft" / "default" / "seed0" / "run.json"
        self.logits = size_dir / "sweep_logits.h5"

    def pixels(self, domain: str, split: str) -> Path:
        return self.dir / "pixels" / f"{domain}_{split}-all.h5"

    def features(self, domain: str, split: str) -> Path:
        return self.dir / "features" / f"{domain}_{split}-all.h5"


def finetune_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's training block, one epoch (``resolved_variant``'s shape)."""
    return {"training": {"epochs": 1, "batch_size": args.batch_size, "lr": 1.0e-3, "weight_decay": 0.1,
                         "warmup_steps": 2, "grad_clip": 1.0, "eval_batch_size": args.eval_batch_size},
            "overrides": {}}


def n_rows(path: Path) -> int:
    from robustft.io.arrays import load_arrays

    return len(load_arrays(path, ("labels",))["labels"])


def run_stage(stage: str, lay: Layout, args: argparse.Namespace) -> dict[str, Any]:
    """One stage at one size, in this (child) process: seconds of the stage's calls, items processed, extras."""
    from robustft.pipeline import stages

    spec = {"name": "efficientnet_lite0", "image_size": args.image_size}
    threads = args.threads
    extra: dict[str, Any] = {}
    start = time.perf_counter()
    if stage == "manifest":
        stages.manifest_stage(dataset="imagefolder", root=str(lay.root), domains=list(DOMAINS), split=SPLIT,
                              on_bad_image="error", threads=threads, out=str(lay.manifest))
        items = len(stages.read_manifest(lay.manifest)[0])
    elif stage == "pixels":
        for domain, split in CACHES:
            lay.pixels(domain, split).parent.mkdir(parents=True, exist_ok=True)
            stages.pixel_stage(manifest=str(lay.manifest), domain=domain, split=split, max_per_class=None,
                               backbone_spec=spec, threads=threads, out=str(lay.pixels(domain, split)))
        items = sum(n_rows(lay.pixels(d, s)) for d, s in CACHES)
        extra["cache MB"] = sum(lay.pixels(d, s).stat().st_size for d, s in CACHES) / 1e6
    elif stage == "features":
        for domain, split in CACHES:
            lay.features(domain, split).parent.mkdir(parents=True, exist_ok=True)
            stages.features_stage(pixels=str(lay.pixels(domain, split)), backbone_spec=spec,
                                  batch_size=args.eval_batch_size, device="cpu", out=str(lay.features(domain, split)))
        items = sum(n_rows(lay.features(d, s)) for d, s in CACHES)
        extra["cache MB"] = sum(lay.features(d, s).stat().st_size for d, s in CACHES) / 1e6
    elif stage == "reference":
        lay.head.parent.mkdir(parents=True, exist_ok=True)
        stages.reference_stage(manifest=str(lay.manifest), backbone_spec=spec,
                               train_features=str(lay.features("id", "train")),
                               val_features=str(lay.features("id", "val")),
                               reference_cfg={"l2_grid": REFERENCE_L2_GRID, "max_iter": REFERENCE_MAX_ITER},
                               templates="simple", out_head=str(lay.head), out_json=str(lay.head_json))
        items = n_rows(lay.features("id", "train"))
        extra["ID val accuracy"] = json.loads(lay.head_json.read_text())["val_accuracy"]
    elif stage == "finetune":
        from robustft.pipeline.runs import finetune_stage

        shutil.rmtree(lay.run_json.parent, ignore_errors=True)
        record = finetune_stage(
            manifest=str(lay.manifest), backbone_spec=spec, method="full_ft", variant="default", seed=0,
            settings=finetune_settings(args), train_pixels=str(lay.pixels("id", "train")),
            val_pixels=str(lay.pixels("id", "val")), train_features=str(lay.features("id", "train")),
            val_features=str(lay.features("id", "val")), reference_head=str(lay.head), run_json=str(lay.run_json),
            device="cpu")
        items = record["n_train"]
        extra["ID val accuracy"] = record["last_val_accuracy"]
        extra["steps"] = record["steps"]
    elif stage == "sweep":
        from robustft.pipeline.analysis import sweep_stage

        alphas = [float(a) for a in args.alphas.split(",")]
        sweep_stage(manifest=str(lay.manifest), backbone_spec=spec, run_json=str(lay.run_json),
                    reference_head=str(lay.head),
                    eval_pixels={n: str(lay.pixels(*n.split("_"))) for n in EVAL},
                    eval_features={n: str(lay.features(*n.split("_"))) for n in EVAL},
                    alphas=alphas, batch_size=args.eval_batch_size, device="cpu", out_logits=str(lay.logits))
        # alpha 0 of a changed encoder comes from the cached features: the forward passes are the other alphas
        items = sum(n_rows(lay.pixels(*n.split("_"))) for n in EVAL) * sum(a != 0.0 for a in alphas)
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "items": items, "per_s": items / seconds, **extra}


def run_compare(kind: str, lay: Layout, args: argparse.Namespace) -> dict[str, Any]:
    """One fine-tuning epoch of the ID train split, streamed from the pixel cache or read whole into memory first."""
    import contextlib

    import numpy as np
    import torch

    from robustft.io.arrays import load_arrays
    from robustft.pipeline.runs import open_split
    from robustft.pipeline.stages import read_manifest
    from robustft.training.checkpoint import load_safetensors
    from robustft.training.data import Split
    from robustft.training.run import RunData, RunSpec, finetune_run

    spec = {"name": "efficientnet_lite0", "image_size": args.image_size}
    _, meta = read_manifest(lay.manifest)
    head = load_safetensors(lay.head)
    training = {**finetune_settings(args)["training"], "select": "last"}
    run_spec = RunSpec(method="full_ft", seed=0, training=training)
    train_pixels, train_features = lay.pixels("id", "train"), lay.features("id", "train")
    run_dir = lay.dir / "compare" / kind
    shutil.rmtree(run_dir, ignore_errors=True)
    size = args.image_size
    empty = Split(torch.zeros(0, dtype=torch.long), torch.zeros((0, size, size, 3), dtype=torch.uint8))  # no val pass
    with contextlib.ExitStack() as stack:
        start = time.perf_counter()
        if kind == "streaming":
            train = open_split("train", train_pixels, train_features, stack)
        else:
            whole = load_arrays(train_pixels, ("pixels", "labels"))
            feats = load_arrays(train_features, ("features",))["features"]
            train = Split(torch.from_numpy(whole["labels"]), torch.from_numpy(np.ascontiguousarray(whole["pixels"])),
                          torch.from_numpy(feats))
        data = RunData(class_names=meta["class_names"], train=train, val=empty)
        record = finetune_run(run_spec, data, backbone=spec, reference_head=dict(head), run_dir=run_dir,
                              device="cpu")
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "items": record["n_train"], "per_s": record["n_train"] / seconds,
            "steps": record["steps"]}


def set_freeze_min_pixels(pixels: int) -> None:
    """Make ``pixels`` the default threshold of the CPU frozen graph of extraction and the sweep (their callers,
    ``features_stage`` and ``sweep_stage``, leave it at the default)."""
    import inspect

    from robustft import evaluation, features

    for fn in (features.extract_features, evaluation.sweep_logits):
        params = [p for p in inspect.signature(fn).parameters.values() if p.default is not inspect.Parameter.empty]
        if any(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params):
            raise SystemExit(f"{fn.__name__}: keyword-only defaults; update set_freeze_min_pixels")
        defaults = list(fn.__defaults__)
        defaults[[p.name for p in params].index("cpu_freeze_min_pixels")] = pixels
        fn.__defaults__ = tuple(defaults)


def child_main(args: argparse.Namespace) -> None:
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # as the rules' logs: progress lines

    torch.set_num_threads(args.threads)
    lay = Layout(args.size_dir)
    if args.freeze_min_pixels is not None:
        set_freeze_min_pixels(args.freeze_min_pixels)
    if args.child.startswith("compare-"):
        result = run_compare(args.child.removeprefix("compare-"), lay, args)
    else:
        result = run_stage(args.child, lay, args)
    result["peak RSS MiB"] = peak_rss_mib()
    print(RESULT + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------- the parent
def spawn(child: str, size_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", child, "--size-dir", str(size_dir),
           "--threads", str(args.threads), "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
           "--eval-batch-size", str(args.eval_batch_size), "--alphas", args.alphas]
    if args.freeze_min_pixels is not None:
        cmd += ["--freeze-min-pixels", str(args.freeze_min_pixels)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "ROBUSTFT_PROGRESS_INTERVAL": os.environ.get("ROBUSTFT_PROGRESS_INTERVAL", "60")}
    load = loadavg()[0]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"stage {child} at {size_dir} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(lines[-1][len(RESULT):])
    result["load"] = (load + loadavg()[0]) / 2
    (size_dir / f"{child}.log").write_text(done.stderr)
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    with work_directory(args.workdir, "robustft-bench-scale-") as workdir:
        run_sizes(args, workdir)


def run_sizes(args: argparse.Namespace, workdir: Path) -> None:
    """Generate both sizes, run every stage at each in a child, then the streaming vs in-memory runs; print tables."""
    stages = [s for s in args.stages.split(",") if s]
    sizes = {"N": args.n, f"{args.factor}N": args.n * args.factor}
    dirs = {}
    for label, n in sizes.items():
        dirs[label] = workdir / f"n{n}"
        if not (dirs[label] / "data").is_dir():
            t0 = time.perf_counter()
            written = generate(dirs[label] / "data", n, args.classes)
            print(f"# generated {label} = {sum(written.values())} images ({written}) over {args.classes} classes in "
                  f"{time.perf_counter() - t0:.1f} s: {dirs[label] / 'data'}", flush=True)
    wait_for_quiet(args.quiet_load, args.wait_quiet)
    info = print_machine(f"EfficientNet-Lite0 at {args.image_size} px, {args.threads} threads, batch "
                         f"{args.batch_size}, sweep alphas {args.alphas}")
    results: dict[str, dict[str, dict]] = {label: {} for label in sizes}
    for label in sizes:
        for stage in stages:
            results[label][stage] = r = spawn(stage, dirs[label], args)
            print(f"# {label} {stage}: {r['seconds']:.1f} s, {r['per_s']:.1f}/s, peak {r['peak RSS MiB']:.0f} MiB, "
                  f"load {r['load']:.1f}", flush=True)
    small, large = sizes
    units = {"manifest": "images checked", "pixels": "images decoded", "features": "images encoded",
             "reference": "train features", "finetune": "train samples (1 epoch)", "sweep": "image forwards"}
    rows = []
    for stage in stages:
        a, b = results[small][stage], results[large][stage]
        rows.append({
            "stage": stage, "unit": units[stage], f"items {small}": a["items"], f"items {large}": b["items"],
            f"peak RSS MiB {small}": a["peak RSS MiB"], f"peak RSS MiB {large}": b["peak RSS MiB"],
            f"{large}/{small} peak": b["peak RSS MiB"] / a["peak RSS MiB"],
            "within 15%": "yes" if b["peak RSS MiB"] <= 1.15 * a["peak RSS MiB"] else "NO",
            f"per s {small}": a["per_s"], f"per s {large}": b["per_s"], f"s {small}": a["seconds"],
            f"s {large}": b["seconds"], f"load {small}": a["load"], f"load {large}": b["load"],
        })
    text = table(rows, title=f"Stages at {small} = {sizes[small]} and {large} = {sizes[large]} images "
                             f"({args.classes} classes, {args.image_size} px)")
    compare_rows, compare_text = [], ""
    if args.compare_repeats > 0 and "finetune" in stages:
        order = []
        for i in range(args.compare_repeats):
            order += ["in-memory", "streaming"] if i % 2 == 0 else ["streaming", "in-memory"]
        runs: dict[str, list[dict]] = {}
        for kind in order:
            r = spawn(f"compare-{kind}", dirs[small], args)
            runs.setdefault(kind, []).append(r)
            print(f"# compare {kind}: {r['seconds']:.1f} s, {r['per_s']:.1f} samples/s, peak "
                  f"{r['peak RSS MiB']:.0f} MiB, load {r['load']:.1f}", flush=True)
        med = {k: statistics.median(x["per_s"] for x in v) for k, v in runs.items()}
        for kind, rs in runs.items():
            compare_rows.append({
                "training": kind, "runs": len(rs), "samples": rs[0]["items"],
                "samples/s (median)": med[kind], "samples/s (best)": max(x["per_s"] for x in rs),
                "% of in-memory (median)": 100 * med[kind] / med["in-memory"],
                "peak RSS MiB": max(x["peak RSS MiB"] for x in rs),
                "load": statistics.mean(x["load"] for x in rs),
            })
        compare_text = table(compare_rows, title=f"One fine-tuning epoch (full_ft) of the {small} ID train split, "
                                                 f"streaming vs read whole first (alternating children)")
    write_json(args.json, {"sizes": sizes, "results": results, "rows": rows, "compare": compare_rows,
                           "tables": [text, compare_text], "args": {k: str(v) for k, v in vars(args).items()},
                           "machine_at_start": info})


if __name__ == "__main__":
    main()
