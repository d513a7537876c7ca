"""robustft.io.logits: the one module that writes and reads the sweep and PCV logit files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from robustft.io.logits import (
    GAMMA_SOURCE_ROLE,
    LogitSplit,
    fold_logits_writer,
    open_fold_logits,
    open_sweep_logits,
    read_sweep_logits,
    sweep_logits_writer,
)
from robustft.io.tables import CorruptArtifactError


def _splits():
    return [LogitSplit("photo_val", "photo", "val", np.array([0, 1, 2, 1, 0])),
            LogitSplit("photo_train", "photo", "train", np.array([2, 2, 1]), GAMMA_SOURCE_ROLE)]


def test_sweep_file_round_trip_in_batches(tmp_path):
    rng = np.random.default_rng(0)
    want = {(a, s.name, k): rng.normal(size=(len(s.labels), 3)).astype(np.float32)
            for a in (1.0, 0.0) for s in _splits() for k in ("linear", "fisher")}
    with sweep_logits_writer(tmp_path / "s.h5", alphas=[1.0, 0.0], interpolations=["linear", "fisher"],
                             splits=_splits(), num_classes=3, head_only=False) as writer:
        for (alpha, name, interp), logits in want.items():
            for start in range(0, len(logits), 2):  # batches of 2 rows
                writer.write(name, interp, alpha, start, logits[start : start + 2])
    with open_sweep_logits(tmp_path / "s.h5") as sweep:
        assert sweep.alphas == [1.0, 0.0] and sweep.interpolations == ["linear", "fisher"] and not sweep.head_only
        assert [s.name for s in sweep.eval_splits()] == ["photo_val"]
        assert sweep.splits["photo_train"].role == GAMMA_SOURCE_ROLE
        np.testing.assert_array_equal(sweep.logits("photo_val", "fisher", 1), want[(0.0, "photo_val", "fisher")])
    alphas, splits = read_sweep_logits(tmp_path / "s.h5")
    np.testing.assert_array_equal(splits["photo_train"]["logits"]["linear"][0], want[(1.0, "photo_train", "linear")])


def test_a_failed_writer_leaves_nothing_and_bad_batches_are_refused(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(ValueError, match="does not fit"):
        with sweep_logits_writer(path, alphas=[0.0], interpolations=["linear"], splits=_splits(), num_classes=3,
                                 head_only=True) as writer:
            writer.write("photo_val", "linear", 0.0, 4, np.zeros((2, 3)))  # rows 4-5 of 5
    assert not path.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="role"):
        with sweep_logits_writer(path, alphas=[0.0], interpolations=["linear"],
                                 splits=[LogitSplit("x", "x", "test", np.zeros(1, int), "scored")], num_classes=3,
                                 head_only=True):
            pass


def test_incomplete_or_unreadable_files_are_refused(tmp_path):
    with h5py.File(tmp_path / "partial.h5", "w") as handle:
        handle.attrs["complete"] = False
    for opener in (open_sweep_logits, open_fold_logits):
        with pytest.raises(CorruptArtifactError, match="partial.h5: incomplete"):
            opener(tmp_path / "partial.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(CorruptArtifactError, match="junk.h5: not a readable HDF5 file"):
        open_sweep_logits(tmp_path / "junk.h5")


def test_fold_file_round_trip(tmp_path):
    labels = np.array([0, 1, 2, 2])
    reference = np.arange(12, dtype=np.float32).reshape(4, 3)
    with fold_logits_writer(tmp_path / "f.h5", alphas=[0.5, 1.0], labels=labels,
                            pseudo_absent=[False, True, False]) as writer:
        writer.write_reference(0, reference[:3])
        writer.write_reference(3, reference[3:])
        writer.write(1.0, 0, -reference)
        writer.write(0.5, 0, reference / 2)
    with open_fold_logits(tmp_path / "f.h5") as fold:
        assert fold.alphas == [0.5, 1.0] and fold.pseudo_absent.tolist() == [False, True, False]
        np.testing.assert_array_equal(fold.labels, labels)
        np.testing.assert_array_equal(fold.reference(), reference)
        np.testing.assert_array_equal(fold.logits(1), -reference)
