"""Pixel and feature caches (HDF5): round trips, crash safety, corrupt and stale files, streamed extraction."""

from __future__ import annotations

import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from robustft.backbones.base import Preprocessing
from robustft.data.adapters import DatasetAdapter
from robustft.data.build import build_manifest
from robustft.data.images import decode_for_cache
from robustft.data.manifest import select_rows
from robustft.data.pixels import (
    PIXEL_COLUMNS,
    compression_pays,
    iter_pixel_batches,
    load_pixel_split,
    pixel_cache_attrs,
    pixel_split_sizes,
    write_pixel_cache,
)
from robustft.features import (
    FEATURE_COLUMNS,
    CpuInferenceGraph,
    cpu_micro_batch,
    extract_features,
    forward_uint8,
    load_features,
)
from robustft.io.arrays import StaleCacheError, array_writer, load_arrays, open_arrays, read_attrs
from robustft.io.atomic import atomic_path, write_json_atomic, write_text_atomic
from robustft.io.prefetch import THREAD_NAME
from robustft.io.tables import CorruptArtifactError, read_table, write_table

SIZE = 8
PRE = Preprocessing(SIZE, "bilinear", (0.5, 0.4, 0.3), (0.25, 0.2, 0.3))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny 1-domain x 2-class layout (varied sizes and modes) and its manifest."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for class_name in ("a", "b"):
        for i in range(7):
            w, h = int(rng.integers(9, 30)), int(rng.integers(9, 30))
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
            if i == 0:
                image = image.convert("L")
            path = root / "dom" / class_name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
    frame, meta = build_manifest(DatasetAdapter(), root, ["dom"], 0.0, 0.0, 0, threads=1)
    return root, frame, meta


@pytest.fixture
def pixel_cache(dataset, tmp_path):
    root, frame, meta = dataset
    rows = select_rows(frame, "dom", "train")
    attrs = pixel_cache_attrs(meta["manifest_hash"], PRE.pixel_key, "dom", "train", None)
    out = tmp_path / "pixels" / "dom_train.h5"
    write_pixel_cache(rows, root, out, SIZE, "bilinear", attrs, threads=2, batch_size=4)
    return out, rows, attrs


# --- pixel cache -----------------------------------------------------------------------------------------------------


def test_pixel_cache_round_trip(dataset, pixel_cache):
    root, _, _ = dataset
    out, rows, attrs = pixel_cache
    assert len(rows) == 14
    split = load_pixel_split(out, attrs)
    assert len(split) == 14
    assert split.pixels.dtype == torch.uint8 and tuple(split.pixels.shape) == (14, SIZE, SIZE, 3)
    expected = np.stack([decode_for_cache(root / p, SIZE, "bilinear") for p in rows["path"]])
    assert np.array_equal(split.pixels.numpy(), expected)
    assert split.labels.tolist() == rows["label"].tolist()
    assert split.row_ids.tolist() == rows["row_id"].tolist()
    with h5py.File(out, "r") as handle:
        stored = read_attrs(handle)
    assert stored["complete"] is True and stored["n_rows"] == 14
    assert {k: stored[k] for k in attrs} == attrs
    assert pixel_split_sizes([out]) == [14]
    assert _leftovers(out.parent) == []


def test_a_bad_image_mid_stream_stops_the_pixel_cache_and_writes_nothing(dataset, tmp_path):
    """Batches are decoded one ahead of the write: a failure in a later batch still leaves no file behind."""
    from robustft.data.images import BadImageError

    root, frame, meta = dataset
    rows = select_rows(frame, "dom", "train")
    broken = tmp_path / "root"
    for path in rows["path"]:
        (broken / path).parent.mkdir(parents=True, exist_ok=True)
        (broken / path).write_bytes((root / path).read_bytes())
    (broken / rows["path"].iloc[10]).write_bytes(b"not an image any more")  # in the third batch of 4
    out = tmp_path / "out" / "p.h5"
    out.parent.mkdir()
    attrs = pixel_cache_attrs(meta["manifest_hash"], PRE.pixel_key, "dom", "train", None)
    with pytest.raises(BadImageError, match=rows["path"].iloc[10]):
        write_pixel_cache(rows, broken, out, SIZE, "bilinear", attrs, threads=2, batch_size=4)
    assert list(out.parent.iterdir()) == []


def test_pixel_batches_stream_the_same_pixels(pixel_cache):
    out, _, attrs = pixel_cache
    whole = load_pixel_split(out, attrs)
    batches = list(iter_pixel_batches(out, 5, attrs))
    assert [len(b[1]) for b in batches] == [5, 5, 4]
    assert torch.equal(torch.cat([b[0] for b in batches]), whole.pixels)
    assert torch.equal(torch.cat([b[2] for b in batches]), whole.row_ids)


def test_pixel_cache_subset(pixel_cache):
    out, _, attrs = pixel_cache
    split = load_pixel_split(out, attrs)
    mask = split.labels == 1
    sub = split.subset(mask)
    assert len(sub) == int(mask.sum()) and (sub.labels == 1).all()


@pytest.mark.parametrize(("key", "value"), [("manifest_hash", "0" * 16), ("pixel_key", "224px_bicubic"),
                                            ("max_per_class", 10), ("split", "val")])
def test_pixel_cache_stale_attrs(pixel_cache, key, value):
    out, _, attrs = pixel_cache
    with pytest.raises(StaleCacheError, match=f"stale cache: {key}") as info:
        load_pixel_split(out, {**attrs, key: value})
    assert str(out) in str(info.value)


# --- the resize matches open_clip's preprocessing --------------------------------------------------------------------

#: (width, height): landscape 4:3 (500 x 375 -> 298 x 224 at 224 px, where rounding gives 299), portrait, square,
#: very wide, a side below the target size (upscaled), odd sizes.
RESIZE_SHAPES = [(500, 375), (375, 500), (300, 300), (1000, 224), (61, 45), (17, 300), (333, 227)]
#: (mode, format): JPEG for RGB, L and CMYK; PNG for palette (with a transparent index), alpha, 1-bit and 16-bit
#: images; GIF for a palette without transparency. PIL resizes palette and 1-bit images with NEAREST.
RESIZE_MODES = [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("P", "GIF"), ("RGBA", "PNG"),
                ("LA", "PNG"), ("1", "PNG"), ("I;16", "PNG")]


def _odd_image(path: Path, size: tuple[int, int], mode: str, fmt: str, seed: int) -> Path:
    """Smooth gradients plus noise (so that resampling filters differ), with varying alpha, saved in ``mode``."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), (xx + yy) * 127 // max(1, w + h - 2)], -1)
    rgb = np.clip(rgb + rng.integers(-40, 40, rgb.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode in ("RGBA", "LA"):
        image = image.convert("RGBA")
        image.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L"))
        image = image.convert(mode)
    elif mode == "I;16":
        image = Image.fromarray((np.asarray(image.convert("L"), np.uint16) * 257).astype("<u2"))
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, fmt, **({"transparency": 0} if (mode, fmt) == ("P", "PNG") else {}))
    return path


def _open_clip_pixels(image: Image.Image, size: int, interpolation: str) -> np.ndarray:
    """open_clip's own eval preprocessing (``image_transform(is_train=False)``) up to Normalize, as uint8 (H, W, 3)."""
    from open_clip.transform import image_transform

    transform = image_transform(size, is_train=False, interpolation=interpolation)
    assert type(transform.transforms[-1]).__name__ == "Normalize"
    tensor = transform.transforms[-2](transform.transforms[-3](transform.transforms[1](transform.transforms[0](image))))
    return (tensor * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize(("mode", "fmt"), RESIZE_MODES, ids=[f"{m}-{f}" for m, f in RESIZE_MODES])
def test_pixel_cache_resize_equals_open_clips_preprocessing(tmp_path, mode, fmt):
    """Every aspect ratio and mode: the cached pixels are exactly open_clip's preprocess before Normalize (bicubic,
    the CLIP models) and torchvision's Resize + CenterCrop (bilinear, EfficientNet-Lite0)."""
    for i, shape in enumerate(RESIZE_SHAPES):
        path = _odd_image(tmp_path / f"{i}.{fmt.lower()}", shape, mode, fmt, seed=i)
        with Image.open(path) as raw:
            assert raw.mode == mode, (raw.mode, mode)
        for size, interpolation in ((224, "bicubic"), (32, "bicubic"), (96, "bilinear")):
            with Image.open(path) as image:
                expected = _open_clip_pixels(image, size, interpolation)
            cached = decode_for_cache(path, size, interpolation)
            assert cached.shape == (size, size, 3) and cached.dtype == np.uint8
            assert np.array_equal(cached, expected), (shape, size, interpolation, np.abs(cached.astype(int) - expected).max())


def test_resize_truncates_the_long_side_as_torchvision_does(tmp_path):
    """500 x 375 at 224 px: torchvision resizes to 298 x 224 (int(224 * 500 / 375) = int(298.67)), not 299 x 224."""
    from torchvision.transforms import functional as TF

    from robustft.data.images import resized_size

    assert resized_size(500, 375, 224) == (298, 224) and resized_size(375, 500, 224) == (224, 298)
    for w, h in RESIZE_SHAPES:
        height, width = TF._compute_resized_output_size((h, w), [224])
        assert resized_size(w, h, 224) == (width, height)


def test_objectnet_border_is_cut_before_open_clips_preprocessing(tmp_path):
    """wise-ft's ObjectNet transform: crop 2 px from every side of the decoded image, then open_clip's preprocess."""
    path = _odd_image(tmp_path / "o.png", (120, 90), "RGBA", "PNG", seed=3)
    with Image.open(path) as image:
        expected = _open_clip_pixels(image.crop((2, 2, 118, 88)), 64, "bicubic")
    assert np.array_equal(decode_for_cache(path, 64, "bicubic", border=2), expected)


# --- crash safety, corrupt files -------------------------------------------------------------------------------------


def test_crash_inside_array_writer_leaves_nothing(tmp_path):
    out = tmp_path / "cache.h5"
    with pytest.raises(RuntimeError, match="simulated crash"):
        with array_writer(out, 10, {"x": ((3,), np.float32)}, {"kind": "test"}) as handle:
            handle["x"][:5] = 1.0
            raise RuntimeError("simulated crash")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_crash_inside_array_writer_keeps_the_previous_file(tmp_path):
    out = tmp_path / "cache.h5"
    with array_writer(out, 2, {"x": ((), np.int64)}, {"version": 1}) as handle:
        handle["x"][...] = [1, 2]
    with pytest.raises(KeyboardInterrupt):
        with array_writer(out, 2, {"x": ((), np.int64)}, {"version": 2}) as handle:
            raise KeyboardInterrupt
    assert load_arrays(out, ("x",), {"version": 1})["x"].tolist() == [1, 2]
    assert _leftovers(tmp_path) == []


def test_attrs_round_trip_none_tuples_and_dicts(tmp_path):
    out = tmp_path / "attrs.h5"
    attrs = {"none": None, "mean": (0.5, 0.25), "spec": {"b": [1, 2], "a": None}, "n": 3, "flag": True, "s": "[x"}
    with array_writer(out, 1, {"x": ((), np.int64)}, attrs):
        pass
    with open_arrays(out, ("x",), attrs) as handle:  # tuples compare equal to what was stored
        stored = read_attrs(handle)
    assert stored["none"] is None and stored["mean"] == [0.5, 0.25] and stored["spec"] == {"a": None, "b": [1, 2]}
    assert stored["n"] == 3 and stored["flag"] is True and stored["s"] == "[x"
    with pytest.raises(StaleCacheError, match="mean"):
        open_arrays(out, ("x",), {"mean": (0.5, 0.3)})
    with pytest.raises(StaleCacheError, match="absent_key"):
        open_arrays(out, ("x",), {"absent_key": None})


def test_open_arrays_rejects_an_incomplete_file(tmp_path):
    # What a writer killed mid-write would leave if the file were not written under a temporary name.
    out = tmp_path / "partial.h5"
    with h5py.File(out, "w") as handle:
        handle.create_dataset("x", shape=(4,), dtype=np.int64)
        handle.attrs["n_rows"] = 4
        handle.attrs["complete"] = False
    with pytest.raises(CorruptArtifactError, match="incomplete") as info:
        open_arrays(out, ("x",))
    assert str(out) in str(info.value)


def test_open_arrays_rejects_missing_columns_and_wrong_row_counts(tmp_path):
    out = tmp_path / "odd.h5"
    with h5py.File(out, "w") as handle:
        handle.create_dataset("x", shape=(3,), dtype=np.int64)
        handle.attrs["n_rows"] = 4
        handle.attrs["complete"] = True
    with pytest.raises(CorruptArtifactError, match="missing dataset 'y'"):
        open_arrays(out, ("y",))
    with pytest.raises(CorruptArtifactError, match="has 3 rows, expected 4"):
        open_arrays(out, ("x",))


def test_open_arrays_rejects_truncated_and_garbage_files(pixel_cache, tmp_path):
    out, _, attrs = pixel_cache
    truncated = tmp_path / "truncated.h5"
    data = out.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    for bad in (truncated, garbage, empty, tmp_path / "absent.h5"):
        with pytest.raises(CorruptArtifactError) as info:
            load_pixel_split(bad, attrs)
        assert str(bad) in str(info.value)


def test_atomic_path_keeps_the_old_file_when_the_block_raises(tmp_path):
    target = tmp_path / "out" / "result.json"
    write_json_atomic(target, {"version": 1})
    with pytest.raises(ValueError, match="boom"):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp != target
            tmp.write_text("half-written")
            raise ValueError("boom")
    assert target.read_text() == '{\n  "version": 1\n}\n'
    assert _leftovers(target.parent) == []
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]


def test_parquet_tables_round_trip_and_detect_corruption(tmp_path):
    import pandas as pd

    path = tmp_path / "t.parquet"
    frame = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    write_table(path, frame, {"hash": "abc"})
    pd.testing.assert_frame_equal(read_table(path, ["a", "b"]), frame)
    with pytest.raises(CorruptArtifactError, match="missing columns"):
        read_table(path, ["c"])
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CorruptArtifactError, match="not a readable Parquet file"):
        read_table(path)


# --- feature caches --------------------------------------------------------------------------------------------------


class TinyEncoder(nn.Module):
    """Conv + global pooling: (N, 3, H, W) -> (N, 6); records the batch sizes it sees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(x.shape[0]))
        return self.conv(x).relu().mean(dim=(2, 3))


def _feature_attrs(pixel_attrs: dict, **changes) -> dict:
    attrs = {
        "kind": "features",
        **{k: pixel_attrs[k] for k in ("manifest_hash", "pixel_key", "domain", "split", "max_per_class")},
        "backbone": "tiny",
        "weights": "tiny.safetensors",
        "weights_sha256": "0123456789abcdef",
        "preprocessing": PRE.pixel_key,
    }
    attrs.update(changes)
    return attrs


@pytest.mark.parametrize("prefetch", [0, 2])
def test_feature_extraction_streams_and_matches_a_direct_forward_pass(pixel_cache, tmp_path, prefetch):
    out, _, pixel_attrs = pixel_cache
    encoder = TinyEncoder()
    attrs = _feature_attrs(pixel_attrs)
    features_path = tmp_path / "features" / "dom_train.h5"
    seen = []
    extract_features(encoder, out, features_path, PRE, attrs, batch_size=4, device="cpu", pixel_attrs=pixel_attrs,
                     progress=seen.append, prefetch=prefetch)
    # streamed in batches of at most 4 (after one 1-image probe for the feature dimension)
    assert encoder.batches[1:] == [4, 4, 4, 2]
    assert seen == [4, 4, 4, 2]
    cache = load_features(features_path, attrs)
    split = load_pixel_split(out, pixel_attrs)
    with torch.no_grad():
        direct = encoder.eval()(PRE.normalize(split.pixels))
    assert cache["features"].dtype == torch.float32 and tuple(cache["features"].shape) == (14, 6)
    torch.testing.assert_close(cache["features"], direct, rtol=1e-5, atol=1e-6)
    assert torch.equal(cache["labels"], split.labels) and torch.equal(cache["row_ids"], split.row_ids)
    assert _leftovers(features_path.parent) == []
    with h5py.File(features_path, "r") as handle:
        assert set(handle) == set(FEATURE_COLUMNS)


def test_cpu_forward_runs_in_micro_batches_with_the_same_outputs(pixel_cache, tmp_path):
    """On CPU, a read batch is encoded in cache-sized micro-batches; outputs equal one pass over the whole batch."""
    out, _, pixel_attrs = pixel_cache
    pixels = load_pixel_split(out, pixel_attrs).pixels  # 14 images of 8 x 8
    assert cpu_micro_batch(224, 224) == 4 and cpu_micro_batch(96, 96) == 21 and cpu_micro_batch(8, 8, None) is None
    encoder = TinyEncoder().eval()
    micro = forward_uint8(encoder, pixels, PRE, torch.device("cpu"), cpu_pixels_per_forward=5 * SIZE * SIZE)
    assert encoder.batches == [5, 5, 4]
    whole = forward_uint8(encoder, pixels, PRE, torch.device("cpu"), cpu_pixels_per_forward=None)
    assert encoder.batches[3:] == [14]
    torch.testing.assert_close(micro, whole, rtol=1e-5, atol=1e-6)
    # extract_features passes the setting through: read batches of 8, forwards of 3
    encoder.batches.clear()
    extract_features(encoder, out, tmp_path / "f.h5", PRE, {"kind": "features"}, batch_size=8, device="cpu",
                     pixel_attrs=pixel_attrs, cpu_pixels_per_forward=3 * SIZE * SIZE)
    assert encoder.batches[1:] == [3, 3, 2, 3, 3]


class FixedBatchEncoder(nn.Module):
    """Traces into a graph that only works for the example's batch size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :6] * int(x.shape[0])  # the batch size becomes a constant of the trace


class TextOutputEncoder(nn.Module):
    def forward(self, x: torch.Tensor) -> str:
        return "not a tensor"


def test_frozen_cpu_encoder_folds_batch_norms_and_falls_back_where_tracing_fails():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        encoder[1].running_mean.uniform_(-1, 1)
        encoder[1].running_var.uniform_(0.5, 2)
    example = torch.randn(4, 3, SIZE, SIZE)
    frozen = CpuInferenceGraph(encoder, example).frozen()
    assert isinstance(frozen, torch.jit.ScriptModule)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())  # folded into the convolution
    other = torch.randn(7, 3, SIZE, SIZE)
    with torch.inference_mode():
        torch.testing.assert_close(frozen(other), encoder(other), rtol=1e-5, atol=1e-5)
    for module in (FixedBatchEncoder(), TextOutputEncoder()):
        assert CpuInferenceGraph(module, example).frozen() is module


def test_pixel_cache_is_compressed_only_where_it_pays(dataset, tmp_path):
    """gzip for images that compress well (flat sketches, clip art); raw chunks for noisy, photo-like ones."""
    rng = np.random.default_rng(0)
    assert compression_pays(np.full((4, 8, 8, 3), 255, np.uint8))
    assert not compression_pays(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    assert not compression_pays(np.zeros((0, 8, 8, 3), np.uint8))
    root = tmp_path / "flat"
    for class_name in ("a", "b"):
        for i in range(4):
            path = root / "dom" / class_name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((20, 20, 3), 250 - i, np.uint8)).save(path)
    frame, meta = build_manifest(DatasetAdapter(), root, ["dom"], 0.0, 0.0, 0, threads=1)
    rows = select_rows(frame, "dom", "train")
    attrs = pixel_cache_attrs(meta["manifest_hash"], PRE.pixel_key, "dom", "train", None)
    flat = tmp_path / "flat.h5"
    write_pixel_cache(rows, root, flat, SIZE, "bilinear", attrs, threads=1, batch_size=4)
    with h5py.File(flat, "r") as handle:
        assert handle["pixels"].compression == "gzip"
    assert load_pixel_split(flat, attrs).pixels.shape == (8, SIZE, SIZE, 3)
    noisy_root, noisy_frame, noisy_meta = dataset  # random pixels: incompressible
    noisy = tmp_path / "noisy.h5"
    noisy_attrs = pixel_cache_attrs(noisy_meta["manifest_hash"], PRE.pixel_key, "dom", "train", None)
    write_pixel_cache(select_rows(noisy_frame, "dom", "train"), noisy_root, noisy, SIZE, "bilinear", noisy_attrs,
                      threads=1, batch_size=4)
    with h5py.File(noisy, "r") as handle:
        assert handle["pixels"].compression is None


@pytest.mark.parametrize(
    ("key", "value"),
    [("manifest_hash", "ffffffffffffffff"), ("weights_sha256", "fedcba9876543210"), ("preprocessing", "224px_bilinear")],
)
def test_stale_feature_cache_is_refused(pixel_cache, tmp_path, key, value):
    out, _, pixel_attrs = pixel_cache
    attrs = _feature_attrs(pixel_attrs)
    features_path = tmp_path / "f.h5"
    extract_features(TinyEncoder(), out, features_path, PRE, attrs, batch_size=8, device="cpu")
    load_features(features_path, attrs)  # the matching expectation is fine
    with pytest.raises(StaleCacheError) as info:
        load_features(features_path, {**attrs, key: value})
    message = str(info.value)
    assert str(features_path) in message and f"stale cache: {key}" in message
    assert repr(value) in message and repr(attrs[key]) in message


def test_expected_feature_attrs_of_the_stage_detect_a_new_backbone(pixel_cache, tmp_path):
    from robustft.pipeline.stages import expected_feature_attrs

    out, _, pixel_attrs = pixel_cache

    class FakeBackbone:
        def __init__(self, sha):
            self.sha = sha

        def identity(self):
            return {"backbone": "tiny", "weights": "w", "weights_sha256": self.sha, "preprocessing": PRE.pixel_key}

    meta = {"manifest_hash": pixel_attrs["manifest_hash"]}
    attrs = {"kind": "features", **pixel_attrs, **FakeBackbone("aaaa").identity()}
    features_path = tmp_path / "f.h5"
    extract_features(TinyEncoder(), out, features_path, PRE, attrs, batch_size=8, device="cpu")
    load_features(features_path, expected_feature_attrs(meta, FakeBackbone("aaaa")))
    with pytest.raises(StaleCacheError, match="weights_sha256"):
        load_features(features_path, expected_feature_attrs(meta, FakeBackbone("bbbb")))
    with pytest.raises(StaleCacheError, match="manifest_hash"):
        load_features(features_path, expected_feature_attrs({"manifest_hash": "other"}, FakeBackbone("aaaa")))


def test_feature_extraction_refuses_a_stale_pixel_cache_and_writes_nothing(pixel_cache, tmp_path):
    out, _, pixel_attrs = pixel_cache
    features_path = tmp_path / "f.h5"
    with pytest.raises(StaleCacheError, match="manifest_hash"):
        extract_features(TinyEncoder(), out, features_path, PRE, _feature_attrs(pixel_attrs), device="cpu",
                         pixel_attrs={**pixel_attrs, "manifest_hash": "other"})
    assert list(tmp_path.glob("*.h5")) == [] and _leftovers(tmp_path) == []


class FailingEncoder(TinyEncoder):
    """Fails on its third forward pass (the 1-image probe, then the first read batch, then the second)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.batches) == 2:
            raise RuntimeError("out of memory on batch 2")
        return super().forward(x)


def test_an_encoder_failure_mid_stream_stops_the_reader_and_writes_nothing(pixel_cache, tmp_path):
    out, _, pixel_attrs = pixel_cache
    features_path = tmp_path / "f.h5"
    with pytest.raises(RuntimeError, match="out of memory on batch 2"):
        extract_features(FailingEncoder(), out, features_path, PRE, _feature_attrs(pixel_attrs), batch_size=2,
                         device="cpu", pixel_attrs=pixel_attrs, prefetch=2)
    assert list(tmp_path.glob("*.h5")) == [] and _leftovers(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name == THREAD_NAME]


def test_pixel_columns_constant():
    assert PIXEL_COLUMNS == ("pixels", "labels", "row_ids")


# --- the data stages end to end: keyword interfaces, threads, progress lines ----------------------------------------


def test_data_stages_chain_with_progress_lines(tmp_path, monkeypatch, caplog):
    """manifest -> pixel caches -> feature caches -> reference head, called as the workflow scripts call them."""
    import json

    from safetensors.torch import load_file

    from robustft.pipeline.stages import features_stage, manifest_stage, pixel_stage, reference_stage

    monkeypatch.setenv("ROBUSTFT_PROGRESS_INTERVAL", "0")
    root = tmp_path / "data"
    rng = np.random.default_rng(1)
    for label, class_name in enumerate(("a", "b")):
        for i in range(8):
            pixels = np.clip(rng.normal(60 + 120 * label, 30, (20 + i, 24, 3)), 0, 255).astype(np.uint8)
            path = root / "dom" / class_name / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    spec = {"name": "efficientnet_lite0", "image_size": 32}
    out = tmp_path / "results"
    with caplog.at_level("INFO", logger="robustft"):
        manifest_stage(dataset="imagefolder", root=str(root), domains=["dom"],
                       split={"val_fraction": 0.25, "test_fraction": 0.0, "seed": 0}, on_bad_image="error",
                       threads=2, out=str(out / "manifest.parquet"))
        for split in ("train", "val"):
            pixel_stage(manifest=str(out / "manifest.parquet"), domain="dom", split=split, max_per_class=None,
                        backbone_spec=spec, threads=2, out=str(out / f"dom_{split}_pixels.h5"))
            features_stage(pixels=str(out / f"dom_{split}_pixels.h5"), backbone_spec=spec, batch_size=4, device="cpu",
                           out=str(out / f"dom_{split}.h5"))
        reference_stage(manifest=str(out / "manifest.parquet"), backbone_spec=spec,
                        train_features=str(out / "dom_train.h5"), val_features=str(out / "dom_val.h5"),
                        reference_cfg={"l2_grid": [0.01, 1.0], "max_iter": 30}, templates="simple",
                        out_head=str(out / "head.safetensors"), out_json=str(out / "reference.json"))
    lines = [r.getMessage() for r in caplog.records]
    for prefix in ("progress verify imagefolder: 0/16 images", "done verify imagefolder: 16 images",
                   "progress decode dom_train: 12/12 images", "done decode dom_train: 12 images",
                   "done decode dom_val: 4 images", "progress encode dom_train_pixels: 4/12 images",
                   "done encode dom_val_pixels: 4 images"):
        assert any(line.startswith(prefix) for line in lines), prefix
    info = json.loads((out / "reference.json").read_text())
    head = load_file(str(out / "head.safetensors"))
    assert head["head.weight"].shape == (2, 1280) and head["head.bias"].shape == (2,)
    assert info["kind"] == "linear_probe" and info["l2"] in (0.01, 1.0)
    val = load_features(out / "dom_val.h5")
    predicted = (val["features"] @ head["head.weight"].T + head["head.bias"]).argmax(1)
    assert info["val_accuracy"] == (predicted == val["labels"]).double().mean().item()
    assert info["val_accuracy"] == dict(map(tuple, info["l2_grid_val_accuracy"]))[info["l2"]]
