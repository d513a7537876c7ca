"""Feature-extraction throughput: this pipeline's path (uint8 pixel cache + ``extract_features``) vs a plain loop.

The plain loop is what one writes without the pipeline: torchvision ``ImageFolder`` over the same images, PIL decode
+ Resize + CenterCrop + ToTensor + Normalize in a ``DataLoader`` (batch 32), fp32, ``torch.no_grad``, the same
encoder. Side by side, in one run, on the same images and model:

* cold: pipeline = decode the JPEGs into the pixel cache (``write_pixel_cache``) + ``extract_features``;
* warm: pipeline = ``extract_features`` from an existing pixel cache (what every later feature job, and the sweep,
  reads); the plain loop decodes every time, so its figure is the same in both rows.

Also: peak memory (VmHWM of a child process) of ``extract_features`` at several dataset sizes; the forward pass's
images/s by model batch size and memory format (``--probe``); the pixel cache's size and read speed with HDF5
compression none / lzf / gzip (``--storage``). ``--backbone open_clip --model ViT-B-32 --device cuda`` measures a
CLIP backbone on a GPU (random weights written on the fly unless ``--pretrained``), with the achieved fraction of
the device's bf16 peak.

Example: ``python bench/bench_extraction.py --n 500 --memory-sizes 250,1000 --probe --storage``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (  # noqa: E402  (bench/ is the script's folder)
    PACS_ROOT,
    add_backbone_args,
    add_common_args,
    backbone_spec_from_args,
    cpu_peak_fp32_gflops,
    current_rss_mib,
    finish_backbone_args,
    forward_flops,
    pacs_rows,
    peak_bf16_flops,
    peak_rss_mib,
    print_machine,
    reset_peak_rss,
    image_folder_tree,
    sync,
    table,
    timed,
    wait_for_quiet,
    write_json,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=PACS_ROOT)
    p.add_argument("--domain", default="photo")
    p.add_argument("--n", type=int, default=500, help="images in the throughput comparison")
    p.add_argument("--batch-size", type=int, default=256, help="pipeline batch (config eval.batch_size, default 256)")
    p.add_argument("--plain-batch-size", type=int, default=32)
    p.add_argument("--plain-workers", default="0,2", help="DataLoader num_workers values to measure (comma list)")
    p.add_argument("--decode-workers", type=int, default=2, help="write_pixel_cache decode threads (rule threads)")
    p.add_argument("--repeats", type=int, default=2, help="timed repetitions of each path (best is reported)")
    p.add_argument("--memory-sizes", default="250,1000", help="dataset sizes for the peak-memory rows ('' = skip)")
    p.add_argument("--probe", action="store_true", help="forward images/s by batch size and memory format")
    p.add_argument("--probe-batch-sizes", default="2,4,8,16,32,64,256")
    p.add_argument("--storage", action="store_true", help="pixel cache compression: size and read speed")
    p.add_argument("--storage-domains", default="photo,art_painting,cartoon,sketch")
    p.add_argument("--storage-n", type=int, default=500)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense bf16 peak")
    p.add_argument("--tmp-dir", type=Path, default=None)
    p.add_argument("--memory-child", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    add_backbone_args(p, default_size=224)
    add_common_args(p)
    args = p.parse_args(argv)
    finish_backbone_args(args, 224)
    return args


# ---------------------------------------------------------------------------------------------------- the two paths
def plain_loop(encoder, folder: Path, preprocessing, batch_size: int, workers: int, device, bf16: bool = False) -> int:
    """ImageFolder + PIL transforms in a DataLoader, fp32 (or bf16 autocast), no_grad; returns the image count."""
    import torch
    from torchvision import datasets, transforms

    interp = {"bilinear": transforms.InterpolationMode.BILINEAR, "bicubic": transforms.InterpolationMode.BICUBIC}
    transform = transforms.Compose([
        transforms.Resize(preprocessing.image_size, interpolation=interp[preprocessing.interpolation]),
        transforms.CenterCrop(preprocessing.image_size),
        transforms.ToTensor(),
        transforms.Normalize(preprocessing.mean, preprocessing.std),
    ])
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    encoder.eval()
    count = 0
    outputs = []
    with torch.no_grad():
        for images, _ in loader:
            images = images.to(device, non_blocking=True)
            if bf16:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = encoder(images)
            else:
                out = encoder(images)
            outputs.append(out.float().cpu())
            count += images.shape[0]
    sync(device)
    return count


def build_cache(rows, root: Path, out: Path, preprocessing, workers: int) -> None:
    from robustft.data.pixels import pixel_cache_attrs, write_pixel_cache

    attrs = pixel_cache_attrs("bench", preprocessing.pixel_key, "bench", "test", None)
    write_pixel_cache(rows, root, out, preprocessing.image_size, preprocessing.interpolation, attrs, workers)


def extract(encoder, pixels: Path, out: Path, preprocessing, batch_size: int, device: str,
            optimised: bool = True, prefetch: int = 2) -> None:
    """``extract_features``; ``optimised=False``: without the CPU micro-batches and the frozen encoder;
    ``prefetch=0``: the pixel cache read inline, not ahead by the reader thread."""
    from robustft.features import CPU_PIXELS_PER_FORWARD, extract_features

    extract_features(encoder, pixels, out, preprocessing, {"kind": "features"}, batch_size, device,
                     cpu_pixels_per_forward=CPU_PIXELS_PER_FORWARD if optimised else None,
                     cpu_freeze_min_pixels=0 if optimised else None, prefetch=prefetch)
    sync(device if not isinstance(device, str) else __import__("torch").device(device))


# ---------------------------------------------------------------------------------------------------- memory child
def memory_child(args: argparse.Namespace) -> None:
    """Runs in a subprocess: build the encoder, extract features from ``--memory-child``, print RSS figures as JSON."""
    import torch

    from robustft.backbones import build_backbone

    torch.set_num_threads(args.threads)
    spec = json.loads(args.spec)
    backbone = build_backbone(spec)
    encoder = backbone.build_encoder()
    with torch.inference_mode():  # allocator warm-up at the batch size, so the baseline holds the model's buffers
        encoder.eval()(backbone.preprocessing.normalize(
            torch.zeros(1, backbone.preprocessing.image_size, backbone.preprocessing.image_size, 3, dtype=torch.uint8)))
    before = current_rss_mib()
    peak_before = peak_rss_mib()
    reset = reset_peak_rss()
    out = Path(args.memory_child).with_suffix(".features.h5")
    extract(encoder, args.memory_child, out, backbone.preprocessing, args.batch_size, args.device)
    out.unlink(missing_ok=True)
    print(json.dumps({"rss_before_mib": before, "peak_before_mib": peak_before, "peak_mib": peak_rss_mib(),
                      "peak_reset": reset}))


def measure_memory(args, spec, rows_for, root: Path, preprocessing, tmp: Path) -> list[dict]:
    results = []
    for n in [int(s) for s in args.memory_sizes.split(",") if s.strip()]:
        rows, _ = rows_for(n)
        cache = tmp / f"memory_{n}.h5"
        if not cache.exists():
            build_cache(rows, root, cache, preprocessing, args.decode_workers)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(cache), "--spec", json.dumps(spec),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--device", args.device]
        wall, proc = timed(lambda: subprocess.run(cmd, capture_output=True, text=True))
        if proc.returncode != 0:
            raise RuntimeError(f"memory child failed:\n{proc.stderr[-3000:]}")
        figures = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append({
            "images": n,
            "pixel cache MiB": cache.stat().st_size / 2**20,
            "RSS after model build, MiB": figures["rss_before_mib"],
            "peak RSS during extraction, MiB": figures["peak_mib"],
            "extraction increment, MiB": figures["peak_mib"] - figures["rss_before_mib"],
            "child wall s": wall,
        })
    return results


# ---------------------------------------------------------------------------------------------------- probes
def probe_forward(encoder, preprocessing, batch_sizes: list[int], device, repeats: int) -> list[dict]:
    """images/s of the bare forward pass (inputs already normalised) by batch size and memory format."""
    import torch

    rows = []
    size = preprocessing.image_size
    n = max(batch_sizes) if device.type == "cuda" else max(64, max(b for b in batch_sizes if b <= 64))
    x8 = torch.randint(0, 256, (max(n, max(batch_sizes)), size, size, 3), dtype=torch.uint8)
    encoder = encoder.eval().to(device)
    for fmt in ("contiguous", "channels_last"):
        memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        module = encoder.to(memory_format=memory_format)
        for b in batch_sizes:
            total = max(b, n)
            x = preprocessing.normalize(x8[:total].to(device)).contiguous(memory_format=memory_format)
            with torch.inference_mode():
                module(x[:b])  # warm-up (oneDNN primitive creation)
                times = []
                for _ in range(repeats):
                    sync(device)
                    t, _ = timed(lambda: [module(x[i : i + b]) for i in range(0, total, b)] and sync(device))
                    times.append(t)
            rows.append({"memory format": fmt, "model batch": b, "images": total, "images/s": total / min(times)})
    encoder.to(memory_format=torch.contiguous_format)
    return rows


def storage_rows(args, root: Path, preprocessing, tmp: Path) -> list[dict]:
    """Pixel cache written with HDF5 filters none / lzf / gzip-1 / gzip-4 (same row chunks): size, write, read."""
    import h5py
    import numpy as np

    from robustft.data.pixels import iter_pixel_batches, load_pixel_split

    results = []
    for domain in [d for d in args.storage_domains.split(",") if d]:
        rows, _ = pacs_rows(root, domain, args.storage_n)
        base = tmp / f"storage_{domain}.h5"
        decode_s, _ = timed(lambda: build_cache(rows, root, base, preprocessing, args.decode_workers))
        with h5py.File(base, "r") as handle:
            pixels = handle["pixels"][...]
            chunks = handle["pixels"].chunks
            chosen = handle["pixels"].compression or "none"
            attrs = dict(handle.attrs)
            labels, row_ids = handle["labels"][...], handle["row_ids"][...]
        raw_mib = pixels.nbytes / 2**20
        for name, kwargs in (("none", {}), ("lzf", {"compression": "lzf"}), ("gzip-1", {"compression": "gzip", "compression_opts": 1}),
                             ("gzip-4", {"compression": "gzip", "compression_opts": 4})):
            path = tmp / f"storage_{domain}_{name}.h5"

            def write():
                with h5py.File(path, "w") as out:
                    out.create_dataset("pixels", data=pixels, chunks=chunks, **kwargs)
                    out.create_dataset("labels", data=labels)
                    out.create_dataset("row_ids", data=row_ids)
                    out.attrs.update(attrs)

            write_s = min(timed(write)[0] for _ in range(2))
            stream_s = min(timed(lambda: [b for b in iter_pixel_batches(path, args.batch_size)])[0] for _ in range(3))
            load_s = min(timed(lambda: load_pixel_split(path))[0] for _ in range(3))
            results.append({
                "domain": domain, "filter": name + (" (chosen)" if name.startswith(chosen) and name != "gzip-4" else ""),
                "images": len(rows), "file MiB": path.stat().st_size / 2**20,
                "size / raw": path.stat().st_size / 2**20 / raw_mib,
                "write ms/1000 img": 1e6 * write_s / len(rows),
                "iter_pixel_batches ms/1000 img": 1e6 * stream_s / len(rows),
                "load_pixel_split ms/1000 img": 1e6 * load_s / len(rows),
                "write_pixel_cache (decode + pipeline choice) ms/1000 img": 1e6 * decode_s / len(rows),
            })
            path.unlink()
        assert np.array_equal(load_pixel_split(base).pixels.numpy(), pixels)
    return results


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_child is not None:
        return memory_child(args)
    import torch

    torch.set_num_threads(args.threads)
    from robustft.backbones import build_backbone

    device = torch.device(args.device)
    tmp_ctx = tempfile.TemporaryDirectory(prefix="robustft-bench-extraction-", dir=args.tmp_dir)
    tmp = Path(tmp_ctx.name)
    spec = backbone_spec_from_args(args, tmp)
    backbone = build_backbone(spec)
    pre = backbone.preprocessing
    root = args.data_root
    rows, classes = pacs_rows(root, args.domain, args.n)
    folder = image_folder_tree(rows, root, tmp / "imagefolder")
    for path in rows["path"]:  # both paths then read the JPEGs from the page cache
        (root / path).read_bytes()

    wait_for_quiet(args.quiet_load, args.wait_quiet)
    info = print_machine(f"backbone {spec.get('model', spec['name'])} at {pre.image_size} px, device {device}")
    build_s, encoder = timed(backbone.build_encoder)
    plain_encoder = backbone.build_encoder().to(device)
    flops = forward_flops(encoder, pre, "cpu")
    print(f"# {len(rows)} images of PACS/{args.domain}; encoder build {build_s:.2f} s (excluded below); "
          f"{flops / 1e9:.3f} GFLOPs per image forward", flush=True)

    workers = [int(w) for w in args.plain_workers.split(",") if w.strip()]
    cache = tmp / "pixels.h5"
    timings: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        timings.setdefault(name, []).append(seconds)

    # warm-up: oneDNN primitives / CUDA context for both models, and the DataLoader's imports
    warm_rows = rows.iloc[: min(len(rows), 2 * args.plain_batch_size)]
    warm_folder = image_folder_tree(warm_rows, root, tmp / "warm_folder")
    build_cache(warm_rows, root, tmp / "warm.h5", pre, args.decode_workers)
    extract(encoder, tmp / "warm.h5", tmp / "warm_features.h5", pre, args.batch_size, args.device)
    plain_loop(plain_encoder, warm_folder, pre, args.plain_batch_size, 0, device)

    for rep in range(args.repeats):
        for w in workers:
            record(f"plain w{w}", timed(lambda: plain_loop(plain_encoder, folder, pre, args.plain_batch_size, w, device))[0])
        if device.type == "cuda":
            record("plain bf16", timed(lambda: plain_loop(plain_encoder, folder, pre, args.plain_batch_size, max(workers), device, bf16=True))[0])
        cache.unlink(missing_ok=True)
        record("decode", timed(lambda: build_cache(rows, root, cache, pre, args.decode_workers))[0])
        out = tmp / f"features_{rep}.h5"
        record("extract", timed(lambda: extract(encoder, cache, out, pre, args.batch_size, args.device))[0])
        out.unlink()
        record("extract, inline read", timed(lambda: extract(encoder, cache, out, pre, args.batch_size, args.device, prefetch=0))[0])
        out.unlink()
        if device.type == "cpu":  # the same without CPU micro-batching: one forward per 256-image read batch
            record("extract, no micro-batch",
                   timed(lambda: extract(encoder, cache, out, pre, args.batch_size, args.device, False))[0])
            out.unlink()
        print(f"# repeat {rep + 1}/{args.repeats} done; loadavg {open('/proc/loadavg').read().split()[0]}", flush=True)

    n = len(rows)
    best = {k: min(v) for k, v in timings.items()}
    plain_best_key = min((k for k in best if k.startswith("plain w")), key=best.get)
    plain_best = best[plain_best_key]
    cold = best["decode"] + best["extract"]
    warm = best["extract"]
    if device.type == "cuda":
        peak = peak_bf16_flops(torch.cuda.get_device_name(), args.peak_tflops)
        peak_label = f"bf16 peak of {torch.cuda.get_device_name()}"
    else:
        peak = (cpu_peak_fp32_gflops(args.threads) or 0) * 1e9 or None
        peak_label = f"fp32 peak of {args.threads} CPU cores"
    rows_out = []
    for w in workers:
        t = best[f"plain w{w}"]
        rows_out.append({"path": f"plain loop (ImageFolder+PIL, DataLoader workers={w}, batch {args.plain_batch_size}, fp32)",
                         "seconds": t, "images/s": n / t, "vs best plain": plain_best / t})
    if "plain bf16" in best:
        t = best["plain bf16"]
        rows_out.append({"path": "plain loop, bf16 autocast", "seconds": t, "images/s": n / t, "vs best plain": plain_best / t})
    rows_out.append({"path": f"pipeline: decode into pixel cache ({args.decode_workers} threads)", "seconds": best["decode"],
                     "images/s": n / best["decode"], "vs best plain": float("nan")})
    rows_out.append({"path": "pipeline cold: decode + extract_features", "seconds": cold, "images/s": n / cold,
                     "vs best plain": plain_best / cold})
    if "extract, no micro-batch" in best:
        t = best["extract, no micro-batch"]
        rows_out.append({"path": f"pipeline warm, eager, one forward per {args.batch_size}-image batch (no micro-batches, no freeze)",
                         "seconds": t, "images/s": n / t, "vs best plain": plain_best / t})
    t = best["extract, inline read"]
    rows_out.append({"path": "pipeline warm, the pixel cache read inline (no reader thread ahead)", "seconds": t,
                     "images/s": n / t, "vs best plain": plain_best / t})
    from robustft.features import cpu_micro_batch

    micro = cpu_micro_batch(pre.image_size, pre.image_size) if device.type == "cpu" else None
    rows_out.append({"path": f"pipeline warm: extract_features from pixel cache (batch {args.batch_size}"
                             + (f", frozen encoder, CPU micro-batches of {micro})" if micro else ")"), "seconds": warm,
                     "images/s": n / warm, "vs best plain": plain_best / warm})
    for r in rows_out:
        r["% of compute peak"] = 100 * flops * r["images/s"] / peak if peak and "decode into" not in r["path"] else float("nan")
    text = table(rows_out, ["path", "seconds", "images/s", "vs best plain", "% of compute peak"],
                 title=f"Extraction throughput, {n} images, best of {args.repeats} ({peak_label}: "
                       f"{(peak or float('nan')) / 1e9:,.0f} GFLOP/s)")
    ratios = {"warm_vs_plain": plain_best / warm, "cold_vs_plain": plain_best / cold, "plain_best": plain_best_key}
    print(f"\nwarm pipeline / best plain loop: {ratios['warm_vs_plain']:.2f}x (target >= 3x); "
          f"cold pipeline / best plain loop: {ratios['cold_vs_plain']:.2f}x", flush=True)

    payload = {"throughput": rows_out, "ratios": ratios, "timings": timings, "flops_per_image": flops,
               "spec": spec, "n": n, "tables": [text]}
    if args.probe:
        probe = probe_forward(backbone.build_encoder(), pre, [int(b) for b in args.probe_batch_sizes.split(",")],
                              device, max(2, args.repeats))
        payload["probe"] = probe
        payload["tables"].append(table(probe, ["memory format", "model batch", "images", "images/s"],
                                       title="Bare forward pass (normalised inputs), by model batch and memory format"))
    if args.memory_sizes.strip():
        rows_for = lambda k: pacs_rows(root, args.domain, k)  # noqa: E731
        memory = measure_memory(args, spec, rows_for, root, pre, tmp)
        payload["memory"] = memory
        payload["tables"].append(table(memory, title=f"Peak memory of extract_features (child process, batch {args.batch_size})"))
    if args.storage:
        storage = storage_rows(args, root, pre, tmp)
        payload["storage"] = storage
        payload["tables"].append(table(storage, title="Pixel cache storage: HDF5 filter vs size and read speed (page cache warm)"))
    write_json(args.json, payload)
    tmp_ctx.cleanup()


if __name__ == "__main__":
    main()
