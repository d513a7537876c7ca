"""Streaming training: batches read from the HDF5 caches are the in-memory ones, bit for bit; memory is bounded by
the batch, not by the split (a run fits in less memory than its pixel cache)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from robustft.io.arrays import ColumnReader, array_writer, contiguous_runs, take_rows
from robustft.methods import get_method
from robustft.methods.base import resolve_hyperparameters
from robustft.pipeline.runs import open_split
from robustft.training.checkpoint import load_safetensors
from robustft.training.context import Split, TrainContext
from robustft.training.data import block_rows, epoch_order, read_batches
from robustft.training.run import RunData, RunSpec, build_reference_model, finetune_run, seeded_and_deterministic
from robustft.training.trainer import train

from tiny_backbone import CLASSES, TinyBackbone, tiny_data  # noqa: E402

TRAINING = {"epochs": 3, "batch_size": 5, "lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 1, "grad_clip": 1.0}
REPO = Path(__file__).resolve().parents[1]


def features_of(split) -> torch.Tensor:
    backbone = TinyBackbone()
    with torch.no_grad():
        return backbone.build_encoder().eval()(backbone.preprocessing.normalize(split.pixels))


def reference_head() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"head.weight": 0.1 * torch.randn(len(CLASSES), 12, generator=g), "head.bias": torch.zeros(len(CLASSES))}


def write_caches(folder: Path, name: str, pixels: np.ndarray, labels: np.ndarray, features: np.ndarray) -> tuple[Path, Path]:
    """A pixel cache and a feature cache as the pipeline writes them (pixels, labels, row_ids / features, ...)."""
    n = len(labels)
    ids = {"labels": ((), np.int64), "row_ids": ((), np.int64)}
    pixel_path, feature_path = folder / f"{name}_pixels.h5", folder / f"{name}_features.h5"
    with array_writer(pixel_path, n, {"pixels": (pixels.shape[1:], np.uint8), **ids}, {"kind": "pixels"}) as out:
        out["pixels"][...], out["labels"][...], out["row_ids"][...] = pixels, labels, np.arange(n) + 100
    with array_writer(feature_path, n, {"features": (features.shape[1:], np.float32), **ids}, {"kind": "features"}) as out:
        out["features"][...], out["labels"][...], out["row_ids"][...] = features, labels, np.arange(n) + 100
    return pixel_path, feature_path


@pytest.fixture(scope="module")
def tiny_caches(tmp_path_factory):
    """The tiny train (24 images) and val (12) splits in memory and written as pixel + feature caches."""
    folder = tmp_path_factory.mktemp("caches")
    splits = {}
    for name, data in (("train", tiny_data(8, seed=0)), ("val", tiny_data(4, seed=1))):
        feats = features_of(data)
        paths = write_caches(folder, name, data.pixels.numpy(), data.labels.numpy(), feats.numpy())
        splits[name] = (data, feats, paths)
    return splits


def in_memory_data(caches) -> RunData:
    (train, train_f, _), (val, val_f, _) = caches["train"], caches["val"]
    return RunData(CLASSES, Split(train.labels, train.pixels, train_f), Split(val.labels, val.pixels, val_f))


@contextlib.contextmanager
def streamed_data(caches):
    with contextlib.ExitStack() as stack:
        yield RunData(CLASSES, open_split("train", *caches["train"][2], stack), open_split("val", *caches["val"][2], stack))


def run(method: str, run_dir: Path, data: RunData, hparams: dict, **kwargs) -> dict:
    return finetune_run(RunSpec(method=method, seed=0, hparams=hparams, training=TRAINING), data,
                        backbone=TinyBackbone(), reference_head=reference_head(), run_dir=run_dir, device="cpu",
                        **kwargs)


def assert_same_run(a: Path, b: Path, file: str) -> None:
    sa, sb = load_safetensors(a / file), load_safetensors(b / file)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    la = pd.read_parquet(a / "train_log.parquet").drop(columns=["samples_per_s"])
    lb = pd.read_parquet(b / "train_log.parquet").drop(columns=["samples_per_s"])
    pd.testing.assert_frame_equal(la, lb)


# ------------------------------------------------------------------------------------------------- reading rows
class CountingDataset:
    """An array that records the index of every read (what ``take_rows`` asks the HDF5 dataset for)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, index):
        self.reads.append(index)
        return self.array[index]


def test_take_rows_reads_each_run_of_consecutive_rows_once_in_ascending_order():
    assert contiguous_runs(np.array([2, 3, 4, 7, 9, 10])) == [(0, 3), (3, 4), (4, 6)]
    assert contiguous_runs(np.array([], dtype=np.int64)) == []
    array = np.arange(20 * 3).reshape(20, 3)
    dataset = CountingDataset(array)
    rows = np.array([9, 3, 4, 17, 2, 10, 16])
    assert np.array_equal(take_rows(dataset, rows), array[rows])  # returned in the order asked for
    assert dataset.reads == [slice(2, 5), slice(9, 11), slice(16, 18)]  # read sorted, one slice per run
    dataset.reads.clear()
    assert np.array_equal(take_rows(dataset, np.array([5, 1, 5])), array[[5, 1, 5]])  # repeats: read once
    assert dataset.reads == [slice(1, 2), slice(5, 6)]
    assert take_rows(dataset, np.array([], dtype=np.int64)).shape == (0, 3)


def test_column_reader_takes_rows_of_an_hdf5_cache(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    path, _ = write_caches(tmp_path, "x", pixels, np.zeros(50, np.int64), np.zeros((50, 2), np.float32))
    rows = np.random.default_rng(1).permutation(50)[:20]
    with ColumnReader(path, "pixels") as reader:
        assert len(reader) == 50 and reader.row_bytes == 48
        assert np.array_equal(reader.take(rows), pixels[rows])
        with pytest.raises(IndexError, match=r"rows outside \[0, 50\)"):
            reader.take(np.array([50]))


def test_array_files_are_chunked_by_a_few_rows(tmp_path):
    columns = {"pixels": ((96, 96, 3), np.uint8), "small": ((8, 8, 3), np.uint8), "features": ((512,), np.float32),
               "labels": ((), np.int64)}
    with array_writer(tmp_path / "a.h5", 10_000, columns, {}):
        pass
    with h5py.File(tmp_path / "a.h5") as handle:
        assert handle["pixels"].chunks == (1, 96, 96, 3)  # one image: a random read reads nothing else
        assert handle["small"].chunks == (170, 8, 8, 3)  # 32 KiB
        assert handle["features"].chunks == (16, 512)
        assert handle["labels"].chunks == (4096,)


# --------------------------------------------------------------------------------------------------- data order
def test_epoch_order_is_the_seeded_permutation_and_shards_like_distributed_sampler():
    order = epoch_order(10, torch.Generator().manual_seed(3))
    assert torch.equal(order, torch.randperm(10, generator=torch.Generator().manual_seed(3)))
    shards = [epoch_order(10, torch.Generator().manual_seed(3), rank=r, world_size=3) for r in range(3)]
    assert [s.tolist() for s in shards] == [order[r::3].tolist() for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="rank 3 outside"):
        epoch_order(10, torch.Generator(), rank=3, world_size=3)


def test_batches_are_the_permutation_whatever_the_block_size_and_read_ahead(tiny_caches):
    data, feats, (pixel_path, feature_path) = tiny_caches["train"]
    order = epoch_order(len(data), torch.Generator().manual_seed(0))
    expected = [(order[i : i + 5], data.pixels[order[i : i + 5]], feats[order[i : i + 5]]) for i in range(0, 24, 5)]
    assert block_rows(5, 192 + 48, budget=1) == 5 and block_rows(5, 240, budget=2400) == 10
    with ColumnReader(pixel_path, "pixels") as pixels, ColumnReader(feature_path, "features") as features:
        for split in (Split(data.labels, data.pixels, feats), Split(data.labels, pixels, features)):
            for budget, ahead in ((1, 0), (1, 1), (2400, 1), (1 << 30, 2)):
                got = list(read_batches(split, order, 5, ("pixels", "features"), block_bytes=budget, read_ahead=ahead))
                assert len(got) == len(expected)
                for batch, (rows, px, ft) in zip(got, expected):
                    assert torch.equal(batch.rows, rows) and torch.equal(batch.labels, data.labels[rows])
                    assert torch.equal(batch.columns["pixels"], px) and torch.equal(batch.columns["features"], ft)
            tail = list(read_batches(split, order, 5, ("pixels",), first_batch=3, block_bytes=1))
            assert [b.rows.tolist() for b in tail] == [r.tolist() for r, _, _ in expected[3:]]
        # a split of selected rows reads those rows of the file
        subset = Split(data.labels, pixels).rows(np.array([20, 3, 7]))
        assert torch.equal(subset.take("pixels", np.array([2, 0])), data.pixels[[7, 20]])


# ------------------------------------------------------------------------------------------- whole runs, bit for bit
@pytest.mark.parametrize("method, hparams", [
    ("full_ft", {"augment": "flip", "checkpoint_every": 2}),
    ("linear_probe", {}),
    ("lp_ft", {"lp_epochs": 2}),
    ("kd", {"kd_weight": 0.7}),
    ("ewc", {"fisher_examples": 10}),
])
def test_streamed_run_equals_the_in_memory_run_bit_for_bit(tmp_path, tiny_caches, method, hparams):
    memory = run(method, tmp_path / "memory", in_memory_data(tiny_caches), hparams)
    with streamed_data(tiny_caches) as data:
        streamed = run(method, tmp_path / "streamed", data, hparams)
    assert_same_run(tmp_path / "memory", tmp_path / "streamed", get_method(method).checkpoint_file)
    for key in ("best_epoch", "best_val_accuracy", "last_val_accuracy", "steps", "n_train", "n_val", "method_info"):
        assert memory[key] == streamed[key], key


def test_streamed_training_equals_in_memory_with_one_batch_per_block(tiny_caches):
    """The trainer itself, with blocks of one batch read ahead (an epoch spans five blocks)."""
    (train_px, train_f, _), (val_px, val_f, _) = tiny_caches["train"], tiny_caches["val"]
    method_cls = get_method("full_ft")
    hp = resolve_hyperparameters(method_cls, TRAINING, {"augment": "flip"})

    def fit(train_split: Split, val_split: Split, block_bytes: int) -> dict[str, torch.Tensor]:
        backbone = TinyBackbone()
        ctx = TrainContext(hp=hp, seed=0, device=torch.device("cpu"), train=train_split, val=val_split,
                           normalize=backbone.preprocessing.normalize, backbone=backbone, class_names=CLASSES,
                           read_block_bytes=block_bytes)
        with seeded_and_deterministic(0):
            return train(build_reference_model(backbone, reference_head(), 3), method_cls(hp), ctx).tensors

    memory = fit(Split(train_px.labels, train_px.pixels), Split(val_px.labels, val_px.pixels), 1 << 30)
    with streamed_data(tiny_caches) as data:
        streamed = fit(data.train, data.val, 1)
    for key in memory:
        assert torch.equal(memory[key], streamed[key]), key


class Killed(Exception):
    pass


def test_resumed_streamed_run_equals_the_uninterrupted_one(tmp_path, tiny_caches):
    hparams = {"augment": "flip", "checkpoint_every": 2}

    def kill_after_step_7(step: int) -> None:
        if step == 7:
            raise Killed

    with streamed_data(tiny_caches) as data:
        run("full_ft", tmp_path / "whole", data, hparams)
        with pytest.raises(Killed):
            run("full_ft", tmp_path / "cut", data, hparams, on_step_end=kill_after_step_7)
    with streamed_data(tiny_caches) as data:  # a new process would open the caches again
        resumed = run("full_ft", tmp_path / "cut", data, hparams)
    assert resumed["resumed_at_step"] == 6  # mid-epoch: epoch 1, batch 1 of 5
    assert_same_run(tmp_path / "whole", tmp_path / "cut", "model.safetensors")


# ----------------------------------------------------------------------------------------------- memory bound
CHILD = textwrap.dedent("""
    import contextlib, json, resource, sys
    import numpy as np, torch
    from torch import nn
    sys.path[:0] = [{repo!r}, {tests!r}]
    from robustft.io.arrays import load_arrays
    from robustft.pipeline.runs import open_split
    from robustft.training.run import RunData, RunSpec, finetune_run
    from tiny_backbone import TinyBackbone

    class Pooled(TinyBackbone):  # the tiny encoder after a 16x16 average pool: cheap on 224-px images
        def build_encoder(self):
            return nn.Sequential(nn.AvgPool2d(16), super().build_encoder())

    def data_kib():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmData:"))

    def fine_tune(rows, run_dir):
        head = {{"head.weight": torch.full((3, 12), 0.01), "head.bias": torch.zeros(3)}}
        spec = RunSpec(method="full_ft", seed=0, training={{"epochs": 1, "batch_size": 16, "select": "last",
                                                            "warmup_steps": 1, "lr": 1e-3}})
        with contextlib.ExitStack() as stack:
            train = open_split("train", {pixels!r}, {features!r}, stack)
            val = open_split("val", {pixels!r}, {features!r}, stack).rows(np.arange(32))
            data = RunData(["a", "b", "c"], train if rows is None else train.rows(rows), val)
            return finetune_run(spec, data, backbone=Pooled(), reference_head=head, run_dir=run_dir, device="cpu")

    torch.set_num_threads(1)
    fine_tune(np.arange(32), {run_dir!r} + "/warm-up")  # lazy imports, kernels, thread pools: fixed costs
    limit = data_kib() * 1024 + {budget}
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:  # the control: under this limit the pixel cache cannot be held in memory
        load_arrays({pixels!r}, ("pixels",))
        loaded = True
    except MemoryError:
        loaded = False
    record = fine_tune(None, {run_dir!r} + "/run")
    print(json.dumps({{"loaded": loaded, "steps": record["steps"], "n_train": record["n_train"]}}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA bounds malloc and mmap on Linux only")
def test_finetuning_fits_in_less_memory_than_its_pixel_cache(tmp_path):
    """A child process allowed 192 MiB of data segment beyond what it holds after a warm-up run fine-tunes for an
    epoch on a 420 MB pixel cache of 224-px images (it peaks near 110 MiB here), and cannot load that cache."""
    n, size = 2800, 224
    ids = {"labels": ((), np.int64), "row_ids": ((), np.int64)}
    pixels, features = tmp_path / "pixels.h5", tmp_path / "features.h5"
    rng = np.random.default_rng(0)
    with array_writer(pixels, n, {"pixels": ((size, size, 3), np.uint8), **ids}, {"kind": "pixels"}) as out:
        block = rng.integers(0, 256, (100, size, size, 3), dtype=np.uint8)
        for start in range(0, n, 100):
            out["pixels"][start : start + 100] = np.roll(block, start // 100, axis=0)
        out["labels"][...], out["row_ids"][...] = np.arange(n) % 3, np.arange(n)
    with array_writer(features, n, {"features": ((12,), np.float32), **ids}, {"kind": "features"}) as out:
        out["features"][...], out["labels"][...], out["row_ids"][...] = 0.0, np.arange(n) % 3, np.arange(n)
    cache_bytes = n * size * size * 3
    budget = 192 << 20
    assert cache_bytes > 2 * budget
    script = CHILD.format(repo=str(REPO), tests=str(REPO / "tests"), budget=budget, pixels=str(pixels),
                          features=str(features), run_dir=str(tmp_path / "run"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] is False  # the limit is real: the cache does not fit under it
    assert result["steps"] == n // 16 + (n % 16 > 0) and result["n_train"] == n
