"""WiSE-FT sweep cost: one ``sweep_logits`` call (the pipeline's sweep rule) vs 11 separate evaluations.

Eval splits are real PACS images in uint8 pixel caches (default: the demo's sizes, photo val 70 + four test splits of
140 images at 96 px). The fine-tuned model is the reference model with perturbed weights, stored as a full_ft run
stores it (``model.safetensors``; parameters moved, batch-norm statistics kept); the reference head is stored as ``head.safetensors``.

* pipeline: what ``sweep_stage`` does: build the classifier once, load both states once, then ONE ``sweep_logits``
  call over all alphas that streams every eval split (pixels and cached features) from its cache batch by batch
  (weights written in place and frozen into a graph traced once; alpha = 0 is the reference model, evaluated as the
  reference head on the cached features);
* pipeline without cached features: the same with 11 forward passes (isolates the alpha = 0 shortcut);
* pipeline, eager model: the same without the per-alpha frozen graph (isolates that);
* naive, in process: per alpha, rebuild the model (pre-trained weights from disk), load the reference head and the
  fine-tuned state from safetensors, interpolate (``interpolate_state_dicts``), read each eval split from its pixel
  cache, predict;
* naive, one process per alpha: the same in a fresh Python process each (a job-per-alpha pipeline also pays the
  interpreter start and the torch import every time).

Head-only runs (linear probe: the encoder is unchanged): the sweep on cached features vs the same sweep on pixels.
All paths' logits are checked against each other.

Example: ``python bench/bench_sweep.py --image-size 96 --val 70 --per-split 140``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (  # noqa: E402
    PACS_ROOT,
    add_common_args,
    pacs_rows,
    print_machine,
    table,
    timed,
    wait_for_quiet,
    write_json,
)

NUM_CLASSES = 7


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=PACS_ROOT)
    p.add_argument("--id-domain", default="photo")
    p.add_argument("--ood-domains", default="art_painting,cartoon,sketch")
    p.add_argument("--val", type=int, default=70, help="ID validation images (demo: 10 per class)")
    p.add_argument("--per-split", type=int, default=140, help="images per test split (demo: 20 per class)")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--alphas", type=int, default=11, help="alpha grid size (0, 0.1, ..., 1 for 11)")
    p.add_argument("--batch-size", type=int, default=256, help="eval.batch_size")
    p.add_argument("--naive-batch-size", type=int, default=32, help="the naive evaluations' plain loop batch")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-subprocess", action="store_true", help="skip the one-process-per-alpha naive path")
    p.add_argument("--naive-child", default=None, help=argparse.SUPPRESS)
    add_common_args(p)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- the naive path
def naive_one_alpha(spec: dict, head_path: Path, finetuned_path: Path, pixel_paths: dict[str, str], alpha: float,
                    batch_size: int) -> dict:
    """What a naive per-alpha evaluation does: rebuild, load both states from disk, interpolate, read, predict.

    Prediction is the plain loop of bench_extraction.py (eager, ``torch.no_grad``, ``batch_size`` images at a time),
    what an evaluation script written without this pipeline does.
    """
    import torch

    from robustft.backbones import build_backbone
    from robustft.data.pixels import load_pixel_split
    from robustft.evaluation import build_classifier
    from robustft.interpolation import interpolate_state_dicts
    from robustft.training.checkpoint import load_safetensors

    backbone = build_backbone(spec)
    model = build_classifier(backbone, NUM_CLASSES)
    head = load_safetensors(head_path)
    model.head.load_state_dict({"weight": head["head.weight"], "bias": head["head.bias"]})
    reference = model.state_dict()
    finetuned = load_safetensors(finetuned_path)
    model.load_state_dict(interpolate_state_dicts(reference, finetuned, alpha))
    out = {}
    for name, path in pixel_paths.items():
        pixels = load_pixel_split(path).pixels
        with torch.no_grad():
            out[name] = torch.cat([model.eval()(backbone.preprocessing.normalize(pixels[i : i + batch_size]))
                                   for i in range(0, len(pixels), batch_size)]).numpy()
    return out


def naive_child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    job = json.loads(args.naive_child)
    logits = naive_one_alpha(job["spec"], Path(job["head"]), Path(job["finetuned"]), job["pixels"], job["alpha"],
                             job["batch_size"])
    np.savez(job["out"], **logits)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.naive_child:
        return naive_child(args)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from robustft.backbones import build_backbone
    from robustft.data.pixels import pixel_cache_attrs, write_pixel_cache
    from robustft.evaluation import CachedColumn, EvalSplit, build_classifier, gather_logits, sweep_logits
    from robustft.features import FREEZE_MIN_PIXELS, extract_features
    from robustft.pipeline.analysis import reference_state
    from robustft.training.checkpoint import load_safetensors, save_safetensors

    tmp_ctx = tempfile.TemporaryDirectory(prefix="robustft-bench-sweep-")
    tmp = Path(tmp_ctx.name)
    spec = {"name": "efficientnet_lite0", "image_size": args.image_size}
    backbone = build_backbone(spec)
    pre = backbone.preprocessing
    alphas = [round(i / (args.alphas - 1), 6) for i in range(args.alphas)]

    # ---- eval splits: pixel caches and feature caches (set-up, untimed)
    wanted = [(args.id_domain, "val", args.val, 0), (args.id_domain, "test", args.per_split, 40)]
    wanted += [(d, "test", args.per_split, 0) for d in args.ood_domains.split(",") if d]
    pixel_paths, feature_paths = {}, {}
    encoder = backbone.build_encoder()
    for domain, split, n, offset in wanted:
        rows, _ = pacs_rows(args.data_root, domain, n, offset=offset)
        name = f"{domain}_{split}"
        pixel_paths[name] = str(tmp / f"{name}.h5")
        feature_paths[name] = str(tmp / f"{name}.features.h5")
        write_pixel_cache(rows, args.data_root, pixel_paths[name], pre.image_size, pre.interpolation,
                          pixel_cache_attrs("bench", pre.pixel_key, domain, split, None))
        extract_features(encoder, pixel_paths[name], feature_paths[name], pre, {"kind": "features"}, args.batch_size, "cpu")
    n_images = sum(n for *_, n, _ in wanted)

    # ---- reference head and two fine-tuned runs (full_ft-like: every weight moved; linear-probe-like: head only)
    gen = torch.Generator().manual_seed(0)
    head = {"head.weight": torch.randn(NUM_CLASSES, backbone.feature_dim, generator=gen) * 0.05,
            "head.bias": torch.zeros(NUM_CLASSES)}
    head_path = tmp / "head.safetensors"
    save_safetensors(head_path, head)
    model = build_classifier(backbone, NUM_CLASSES)
    ref = reference_state(model, head_path)
    trained = {name for name, _ in model.named_parameters()}  # parameters move; batch-norm statistics stay valid
    full = {k: (v + 0.01 * v.std() * torch.randn(v.shape, generator=gen)) if k in trained and v.numel() > 1 else v.clone()
            for k, v in ref.items()}
    full_path = tmp / "full_ft" / "model.safetensors"
    full_path.parent.mkdir()
    save_safetensors(full_path, full)
    head_only = {k: v.clone() for k, v in ref.items()}
    head_only["head.weight"] = head_only["head.weight"] + 0.05 * torch.randn(head_only["head.weight"].shape, generator=gen)
    head_only_path = tmp / "linear_probe" / "model.safetensors"
    head_only_path.parent.mkdir()
    save_safetensors(head_only_path, head_only)

    def pipeline(finetuned_path: Path, with_features: bool, with_pixels: bool = True, freeze: bool = True) -> tuple[float, dict]:
        """sweep_stage's work, timed from the model build to the last logits."""
        def go():
            model = build_classifier(backbone, NUM_CLASSES)
            reference = reference_state(model, head_path)
            finetuned = load_safetensors(finetuned_path)
            splits = []
            for name in pixel_paths:
                labels = CachedColumn(feature_paths[name], "labels").read()
                pixels = CachedColumn(pixel_paths[name], "pixels") if with_pixels else None
                features = CachedColumn(feature_paths[name], "features") if with_features else None
                splits.append(EvalSplit(name, *name.rsplit("_", 1), labels, pixels, features))
            out = gather_logits(sweep_logits(model, reference, finetuned, alphas, splits, pre, torch.device("cpu"),
                                             args.batch_size,
                                             cpu_freeze_min_pixels=FREEZE_MIN_PIXELS if freeze else None))
            for (alpha, name), logits in out.items():
                if not np.isfinite(logits).all():
                    raise RuntimeError(f"alpha={alpha} {name}: non-finite logits (broken synthetic weights)")
            return out
        return timed(go)

    def naive(finetuned_path: Path) -> tuple[float, dict]:
        def go():
            out = {}
            for alpha in alphas:
                for name, logits in naive_one_alpha(spec, head_path, finetuned_path, pixel_paths, alpha,
                                                    args.naive_batch_size).items():
                    out[(alpha, name)] = logits
            return out
        return timed(go)

    def naive_processes(finetuned_path: Path) -> tuple[float, dict]:
        def go():
            out = {}
            for i, alpha in enumerate(alphas):
                job = {"spec": spec, "head": str(head_path), "finetuned": str(finetuned_path), "pixels": pixel_paths,
                       "alpha": alpha, "batch_size": args.naive_batch_size, "out": str(tmp / f"naive_{i}.npz")}
                cmd = [sys.executable, str(Path(__file__).resolve()), "--naive-child", json.dumps(job),
                       "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(proc.stderr[-3000:])
                with np.load(job["out"]) as saved:
                    out.update({(alpha, k): saved[k] for k in saved.files})
            return out
        return timed(go)

    # warm-up: oneDNN primitives for the eval shapes
    pipeline(full_path, True)
    wait_for_quiet(args.quiet_load, args.wait_quiet)
    print_machine(f"EfficientNet-Lite0 at {pre.image_size} px, {len(pixel_paths)} eval splits, {n_images} images, "
                  f"{len(alphas)} alphas")

    paths = [
        ("pipeline: one sweep_logits call (as sweep_stage; alpha=0 on cached features)", lambda: pipeline(full_path, True)),
        ("pipeline without cached features (11 forward passes)", lambda: pipeline(full_path, False)),
        ("pipeline, eager model (no per-alpha frozen graph)", lambda: pipeline(full_path, True, freeze=False)),
        ("naive: 11 evaluations in process (rebuild, load, interpolate, read, plain loop)", lambda: naive(full_path)),
    ]
    if not args.no_subprocess:
        paths.append(("naive: 11 evaluations, one process each", lambda: naive_processes(full_path)))
    head_paths = [
        ("head-only run: sweep on cached features", lambda: pipeline(head_only_path, True, with_pixels=False)),
        ("head-only run: same sweep on pixels", lambda: pipeline(head_only_path, False)),
    ]
    timings: dict[str, list[float]] = {}
    outputs: dict[str, dict] = {}
    for rep in range(args.repeats):
        for name, fn in paths + head_paths:
            seconds, out = fn()
            timings.setdefault(name, []).append(seconds)
            outputs[name] = out
        print(f"# repeat {rep + 1}/{args.repeats} done; loadavg {open('/proc/loadavg').read().split()[0]}", flush=True)

    def max_diff(a: dict, b: dict) -> float:
        assert a.keys() == b.keys(), "the paths produced different (alpha, split) sets"
        return max(float(np.abs(a[k] - b[k]).max()) for k in a)

    best = {k: min(v) for k, v in timings.items()}
    base = paths[0][0]
    rows = []
    for name, _ in paths:
        rows.append({"path": name, "seconds": best[name], "images x alphas / s": n_images * len(alphas) / best[name],
                     "cost vs pipeline": best[name] / best[base],
                     "max |logit diff| vs pipeline": max_diff(outputs[name], outputs[base])})
    text1 = table(rows, title=f"WiSE-FT sweep of {len(alphas)} alphas, full fine-tuning run, {n_images} eval images "
                              f"at {pre.image_size} px, best of {args.repeats}")
    hbase = head_paths[1][0]
    hrows = []
    for name, _ in head_paths:
        hrows.append({"path": name, "seconds": best[name], "cost vs pixel sweep": best[name] / best[hbase],
                      "speed-up": best[hbase] / best[name],
                      "max |logit diff| vs pixel sweep": max_diff(outputs[name], outputs[hbase])})
    text2 = table(hrows, title="Head-only run (encoder unchanged): cached-feature sweep vs pixel sweep")
    by_prefix = lambda prefix: next(name for name, _ in paths if name.startswith(prefix))  # noqa: E731
    ratio = best[by_prefix("naive: 11 evaluations in process")] / best[base]
    summary = {"naive_in_process_vs_pipeline": ratio, "head_only_speedup": best[hbase] / best[head_paths[0][0]]}
    if not args.no_subprocess:
        summary["naive_processes_vs_pipeline"] = best[by_prefix("naive: 11 evaluations, one process")] / best[base]
    print("\n" + "; ".join(f"{k}: {v:.2f}x" for k, v in summary.items()) + " (target: naive / pipeline >= 5x)",
          flush=True)
    write_json(args.json, {"rows": rows, "head_only": hrows, "timings": timings, "ratios": summary,
                           "n_images": n_images, "alphas": alphas, "tables": [text1, text2]})
    tmp_ctx.cleanup()


if __name__ == "__main__":
    main()
