"""Shared helpers of the benchmarks: machine description, quiet-machine wait, timing, tables, PACS subsets, backbones.

The benchmarks are scripts, not tests: each prints absolute figures and ratios measured side by side in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PACS_ROOT = Path(os.environ.get("ROBUSTFT_PACS_ROOT", "/work/shared/data/PACS"))
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}

#: A tiny random CLIP (as tests/conftest.py): ViT 32 px / patch 8, 2+2 layers of width 32, 16-d embeddings.
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

#: Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against ``torch.cuda.get_device_name()``.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 70.0),  # AWS A10G (fp32 accumulate)
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 0.0),  # no bf16 tensor cores
)


# ---------------------------------------------------------------------------------------------------- the machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_mhz() -> float | None:
    """The nominal clock from /proc/cpuinfo (``cpu MHz``, else BogoMIPS / 2)."""
    try:
        text = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    for key, scale in (("cpu MHz", 1.0), ("bogomips", 0.5)):
        for line in text:
            if line.lower().startswith(key.lower()):
                try:
                    return float(line.split(":", 1)[1]) * scale
                except ValueError:
                    pass
    return None


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_peak_fp32_gflops(cores: int) -> float | None:
    """Peak fp32 FLOP/s of ``cores`` cores: 2 FMA pipes x vector width x 2 FLOP x clock (AVX2: 8 lanes, AVX-512: 16)."""
    mhz = cpu_mhz()
    if mhz is None:
        return None
    lanes = 16 if "avx512f" in cpu_flags() else 8 if "avx2" in cpu_flags() else 4
    return cores * mhz * 1e-3 * 2 * lanes * 2


def total_ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def loadavg() -> tuple[float, float, float]:
    try:
        a, b, c = Path("/proc/loadavg").read_text().split()[:3]
        return float(a), float(b), float(c)
    except OSError:
        return (float("nan"),) * 3


def machine_info() -> dict[str, Any]:
    import torch

    info = {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "cpu_mhz": cpu_mhz(),
        "ram_gib": round(total_ram_gib(), 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg": loadavg(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_machine(extra: str = "") -> dict[str, Any]:
    info = machine_info()
    print(
        f"# machine: {info['nproc']} CPUs ({info['cpu']}, {info['cpu_mhz'] or 0:.0f} MHz), {info['ram_gib']} GiB RAM, "
        f"python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads)"
        + (f", GPU {info['gpu']}" if "gpu" in info else "")
        + f"; loadavg {info['loadavg'][0]:.2f} {info['loadavg'][1]:.2f} {info['loadavg'][2]:.2f}"
        + (f"; {extra}" if extra else ""),
        flush=True,
    )
    return info


def wait_for_quiet(threshold: float, max_wait: float, settle: float = 20.0) -> float:
    """Wait until the 1-minute load average has stayed below ``threshold`` for ``settle`` s (at most ``max_wait`` s).

    Returns the load average at the end; prints a note when the machine never got quiet.
    """
    if max_wait <= 0:
        return loadavg()[0]
    deadline = time.monotonic() + max_wait
    quiet_since = None
    while time.monotonic() < deadline:
        load = loadavg()[0]
        if load < threshold:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= settle:
                return load
        else:
            quiet_since = None
        time.sleep(2.0)
    load = loadavg()[0]
    print(f"# note: the machine did not get quiet (loadavg {load:.2f} >= {threshold}) within {max_wait:.0f} s; "
          "measuring anyway", flush=True)
    return load


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: nproc)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to SECONDS for the 1-min loadavg to stay below --quiet-load")
    parser.add_argument("--quiet-load", type=float, default=1.2)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")


@contextlib.contextmanager
def work_directory(workdir: Path | None, prefix: str) -> Iterator[Path]:
    """``workdir`` (created if needed, kept afterwards), or a temporary folder removed on exit."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


# ---------------------------------------------------------------------------------------------------- measuring
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def best_and_median(times: Sequence[float]) -> tuple[float, float]:
    return min(times), statistics.median(times)


def evict_page_cache(path: Path) -> None:
    """Drop ``path``'s pages from the OS page cache (no root needed), so that the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def peak_rss_mib() -> float:
    """Peak resident set of this process (VmHWM), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def table(rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None, title: str | None = None) -> str:
    """A Markdown table (floats to 3 significant digits, or 1 decimal above 100)."""
    rows = list(rows)
    columns = list(columns or (rows[0].keys() if rows else []))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "n/a"
            if abs(v) >= 100:
                return f"{v:,.1f}"
            return f"{v:.3g}"
        return str(v)

    lines = []
    if title:
        lines.append(f"\n### {title}\n")
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine_info(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str))


# ---------------------------------------------------------------------------------------------------- PACS subsets
def pacs_rows(root: Path, domain: str, n: int, offset: int = 0):
    """``n`` images of one domain, spread evenly over the classes (sorted paths, deterministic), as manifest rows.

    Columns ``row_id``, ``path`` (relative to ``root``), ``label``, ``class_name``; ``offset`` skips the first
    ``offset`` images per class (for disjoint subsets).
    """
    import pandas as pd

    domain_dir = Path(root) / domain
    if not domain_dir.is_dir():
        raise SystemExit(f"PACS domain folder not found: {domain_dir} (give --data-root)")
    classes = sorted(p.name for p in domain_dir.iterdir() if p.is_dir())
    per_class = {c: sorted(p for p in (domain_dir / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) for c in classes}
    rows = []
    rank = offset
    while len(rows) < n:
        added = False
        for label, c in enumerate(classes):
            if rank < len(per_class[c]) and len(rows) < n:
                rows.append({"path": str(per_class[c][rank].relative_to(root)), "label": label, "class_name": c})
                added = True
        rank += 1
        if not added:
            raise SystemExit(f"{domain_dir}: only {len(rows)} images available, {n} asked for")
    frame = pd.DataFrame(rows).sort_values(["label", "path"]).reset_index(drop=True)
    frame.insert(0, "row_id", range(len(frame)))
    return frame, classes


def image_folder_tree(rows, root: Path, dest: Path) -> Path:
    """A torchvision ``ImageFolder`` tree (``dest/<class>/<file>`` symlinks) holding exactly ``rows``."""
    for path, class_name in zip(rows["path"], rows["class_name"]):
        link = dest / class_name / Path(path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(Path(root) / path)
    return dest


# ---------------------------------------------------------------------------------------------------- backbones
def backbone_spec_from_args(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The backbone spec for ``--backbone``: EfficientNet-Lite0 with its packaged weights, or an open_clip model.

    open_clip without ``--pretrained``: a random checkpoint of the model is written to ``workdir`` on the fly
    (throughput does not depend on the weights' values). ``--model-config tiny`` writes the tests' tiny config.
    """
    if args.backbone == "efficientnet_lite0":
        return {"name": "efficientnet_lite0", "image_size": args.image_size}
    import open_clip
    import torch
    from safetensors.torch import save_file

    spec: dict[str, Any] = {"name": "open_clip"}
    model = args.model
    if args.model_config:
        config_path = Path(args.model_config)
        if args.model_config == "tiny":
            config_path = workdir / "robustft-bench-tiny-clip.json"
            config_path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
        spec["model_config"] = str(config_path)
        model = config_path.stem
        open_clip.add_model_config(config_path)
    spec["model"] = model
    if args.pretrained:
        spec["pretrained"] = args.pretrained
    else:
        checkpoint = workdir / f"{model}-random.safetensors"
        if not checkpoint.exists():
            torch.manual_seed(0)
            net = open_clip.create_model(model, pretrained=None)
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(checkpoint))
            del net
        spec["pretrained"] = str(checkpoint)
    if args.image_size and args.image_size_given:
        spec["image_size"] = args.image_size
    return spec


def add_backbone_args(parser: argparse.ArgumentParser, default_size: int) -> None:
    parser.add_argument("--backbone", choices=("efficientnet_lite0", "open_clip"), default="efficientnet_lite0")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (with --backbone open_clip)")
    parser.add_argument("--model-config", default=None,
                        help="open_clip model config JSON, or 'tiny' for the tests' tiny random CLIP")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip checkpoint file or tag; default: a random checkpoint written on the fly")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"input resolution (EfficientNet default {default_size}; open_clip: the model's own)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def finish_backbone_args(args: argparse.Namespace, default_size: int) -> None:
    args.image_size_given = args.image_size is not None
    if args.image_size is None:
        args.image_size = default_size


def peak_bf16_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12 if tflops else None
    return None


def forward_flops(module, preprocessing, device) -> float:
    """FLOPs of one image's forward pass (``torch.utils.flop_counter``: 2 per multiply-add, matmuls and convs only)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, preprocessing.image_size, preprocessing.image_size, 3, dtype=torch.uint8, device=device)
    was_training = module.training
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module.eval()(preprocessing.normalize(x))
    module.train(was_training)
    return float(counter.get_total_flops())


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()
