"""The logit files of the analysis stages, written and read only here.

``sweep_logits.h5`` (rule ``sweep``, one per run)::

    attrs   alphas float64 [A], interpolations (JSON list, e.g. ["linear", "fisher"]), head_only, num_classes,
            complete (set last)
    /<split>            one group per evaluated split, named <domain>_<split> (e.g. photo_test)
        attrs   domain, split, role ("eval": scored in metrics.parquet; "gamma_source": only used to choose gamma)
        labels          int64 [N]
        <interpolation> float32 [A, N, C]   logits of every alpha, model classes (projections are applied later)

``val_logits.h5`` (rule ``pcv_logits``, one per PCV fold)::

    attrs   alphas float64 [A], num_classes, complete
    labels          int64 [N]        ID validation labels
    pseudo_absent   bool [C]         classes this fold's model was not fine-tuned on (the run's absent ones excluded)
    reference       float32 [N, C]   the reference model's logits (alpha 0, whatever the alpha grid)
    logits          float32 [A, N, C]

Both are written batch by batch (chunks of one alpha and a block of rows, so a batch touches few chunks and one
alpha's slice reads contiguously) under a temporary name, marked complete after the last batch, then renamed.
Readers open the file lazily and read one (split, interpolation, alpha) slice at a time.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np

from robustft.io.atomic import atomic_path
from robustft.io.tables import CorruptArtifactError

#: Roles of a split in a sweep file.
EVAL_ROLE, GAMMA_SOURCE_ROLE = "eval", "gamma_source"
ROLES = (EVAL_ROLE, GAMMA_SOURCE_ROLE)
#: Bytes of logits per chunk (one alpha, a block of rows).
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class LogitSplit:
    """One split of a sweep file: its group name, domain, split, labels and role."""

    name: str
    domain: str
    split: str
    labels: np.ndarray
    role: str = EVAL_ROLE


def _chunks(n_alphas: int, n_rows: int, n_classes: int) -> tuple[int, int, int] | None:
    if not (n_alphas and n_rows and n_classes):
        return None
    rows = max(1, min(n_rows, _CHUNK_BYTES // (4 * n_classes)))
    return (1, rows, n_classes)


def _check_batch(what: str, logits: np.ndarray, start: int, n_rows: int, n_classes: int) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or logits.shape[1] != n_classes or start < 0 or start + logits.shape[0] > n_rows:
        raise ValueError(f"{what}: a batch of shape {logits.shape} at row {start} does not fit ({n_rows}, {n_classes})")
    return logits


class _LogitFile:
    """An open, complete logit file, for reading (a context manager); each kind reads its own layout in ``_read``."""

    kind = "logits"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._handle = h5py.File(self.path, "r")
        except Exception as exc:  # noqa: BLE001 - any failure to open is one message naming the file
            raise CorruptArtifactError(f"{self.path}: not a readable HDF5 file ({exc})") from None
        try:
            if not self._handle.attrs.get("complete"):
                raise CorruptArtifactError(f"{self.path}: incomplete {self.kind} file (not marked complete)")
            self._read()
        except Exception:
            self._handle.close()
            raise

    def _read(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ sweep_logits.h5
class SweepLogitsWriter:
    """Writes batches of one sweep file (made by :func:`sweep_logits_writer`)."""

    def __init__(self, handle: h5py.File, alphas: Sequence[float], splits: Mapping[str, LogitSplit]) -> None:
        self._handle = handle
        self._alpha_index = {float(a): i for i, a in enumerate(alphas)}
        self.splits = dict(splits)

    def write(self, split: str, interpolation: str, alpha: float, start: int, logits: np.ndarray) -> None:
        """Logits of rows ``start:start + len(logits)`` of ``split`` at ``alpha``."""
        data = self._handle[split][interpolation]
        logits = _check_batch(f"{split}/{interpolation}", logits, start, data.shape[1], data.shape[2])
        data[self._alpha_index[float(alpha)], start : start + logits.shape[0]] = logits


@contextmanager
def sweep_logits_writer(
    path: str | Path,
    *,
    alphas: Sequence[float],
    interpolations: Sequence[str],
    splits: Sequence[LogitSplit],
    num_classes: int,
    head_only: bool,
) -> Iterator[SweepLogitsWriter]:
    """Create ``sweep_logits.h5`` with every dataset allocated; complete and renamed into place when the block ends."""
    alphas = [float(a) for a in alphas]
    if len(set(alphas)) != len(alphas):
        raise ValueError(f"alphas must be distinct, got {alphas}")
    for split in splits:
        if split.role not in ROLES:
            raise ValueError(f"split {split.name}: role {split.role!r} is not one of {ROLES}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.attrs["alphas"] = np.asarray(alphas, dtype=np.float64)
        handle.attrs["interpolations"] = json.dumps(list(interpolations))
        handle.attrs["head_only"] = bool(head_only)
        handle.attrs["num_classes"] = int(num_classes)
        handle.attrs["complete"] = False
        for split in splits:
            group = handle.create_group(split.name)
            group.attrs.update({"domain": split.domain, "split": split.split, "role": split.role})
            group["labels"] = np.asarray(split.labels, dtype=np.int64)
            shape = (len(alphas), len(split.labels), int(num_classes))
            for interp in interpolations:
                group.create_dataset(interp, shape=shape, dtype=np.float32, chunks=_chunks(*shape))
        yield SweepLogitsWriter(handle, alphas, {s.name: s for s in splits})
        handle.attrs["complete"] = True


class SweepLogits(_LogitFile):
    """An open, complete ``sweep_logits.h5``: its alphas, interpolations and splits; logits read one slice at a time."""

    kind = "sweep logits"

    def _read(self) -> None:
        attrs = self._handle.attrs
        self.alphas = [float(a) for a in attrs["alphas"]]
        self.interpolations = list(json.loads(attrs["interpolations"]))
        self.head_only = bool(attrs["head_only"])
        self.splits: dict[str, LogitSplit] = {}
        for name, group in self._handle.items():
            self.splits[name] = LogitSplit(name, str(group.attrs["domain"]), str(group.attrs["split"]),
                                           group["labels"][...], str(group.attrs.get("role", EVAL_ROLE)))

    def logits(self, split: str, interpolation: str, alpha_index: int) -> np.ndarray:
        """(N, C) float32 logits of ``split`` under ``interpolation`` at ``alphas[alpha_index]``."""
        return self._handle[split][interpolation][alpha_index]

    def eval_splits(self) -> list[LogitSplit]:
        return [s for s in self.splits.values() if s.role == EVAL_ROLE]


def open_sweep_logits(path: str | Path) -> SweepLogits:
    """Open a sweep file for reading (a context manager); refuses an incomplete or unreadable file."""
    return SweepLogits(path)


def read_sweep_logits(path: str | Path) -> tuple[list[float], dict[str, dict[str, Any]]]:
    """The whole file in memory (tests, small runs): alphas and, per split, its ``labels``, ``domain``, ``split``,
    ``role`` and ``logits`` per interpolation as (A, N, C) arrays."""
    with open_sweep_logits(path) as sweep:
        splits = {}
        for name, split in sweep.splits.items():
            splits[name] = {"labels": split.labels, "domain": split.domain, "split": split.split, "role": split.role,
                            "logits": {k: sweep._handle[name][k][...] for k in sweep.interpolations}}
        return sweep.alphas, splits


# ------------------------------------------------------------------------------------------- PCV val_logits.h5
class FoldLogitsWriter:
    """Writes batches of one PCV fold file (made by :func:`fold_logits_writer`)."""

    def __init__(self, handle: h5py.File, alphas: Sequence[float]) -> None:
        self._handle = handle
        self._alpha_index = {float(a): i for i, a in enumerate(alphas)}

    def write(self, alpha: float, start: int, logits: np.ndarray) -> None:
        data = self._handle["logits"]
        logits = _check_batch("logits", logits, start, data.shape[1], data.shape[2])
        data[self._alpha_index[float(alpha)], start : start + logits.shape[0]] = logits

    def write_reference(self, start: int, logits: np.ndarray) -> None:
        data = self._handle["reference"]
        logits = _check_batch("reference", logits, start, data.shape[0], data.shape[1])
        data[start : start + logits.shape[0]] = logits


@contextmanager
def fold_logits_writer(
    path: str | Path, *, alphas: Sequence[float], labels: np.ndarray, pseudo_absent: np.ndarray
) -> Iterator[FoldLogitsWriter]:
    """Create a PCV fold's ``val_logits.h5``; complete and renamed into place when the block ends."""
    alphas = [float(a) for a in alphas]
    mask = np.asarray(pseudo_absent, dtype=bool).reshape(-1)
    shape = (len(alphas), len(labels), mask.size)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.attrs["alphas"] = np.asarray(alphas, dtype=np.float64)
        handle.attrs["num_classes"] = mask.size
        handle.attrs["complete"] = False
        handle["labels"] = np.asarray(labels, dtype=np.int64)
        handle["pseudo_absent"] = mask
        reference_chunks = _chunks(1, *shape[1:])
        handle.create_dataset("reference", shape=shape[1:], dtype=np.float32,
                              chunks=reference_chunks[1:] if reference_chunks else None)
        handle.create_dataset("logits", shape=shape, dtype=np.float32, chunks=_chunks(*shape))
        yield FoldLogitsWriter(handle, alphas)
        handle.attrs["complete"] = True


class FoldLogits(_LogitFile):
    """An open, complete PCV fold file: alphas, labels, pseudo-absent mask; reference and per-alpha logits on demand."""

    kind = "PCV logits"

    def _read(self) -> None:
        for name in ("labels", "pseudo_absent", "reference", "logits"):
            if name not in self._handle:
                raise CorruptArtifactError(f"{self.path}: missing dataset {name!r}")
        self.alphas = [float(a) for a in self._handle.attrs["alphas"]]
        self.labels = self._handle["labels"][...]
        self.pseudo_absent = self._handle["pseudo_absent"][...].astype(bool)

    def reference(self) -> np.ndarray:
        """(N, C) logits of the reference model (the PCV floor's model)."""
        return self._handle["reference"][...]

    def logits(self, alpha_index: int) -> np.ndarray:
        """(N, C) logits of the fold model's WiSE-FT point ``alphas[alpha_index]``."""
        return self._handle["logits"][alpha_index]


def open_fold_logits(path: str | Path) -> FoldLogits:
    """Open a PCV fold file for reading (a context manager); refuses an incomplete or unreadable file."""
    return FoldLogits(path)


__all__ = [
    "EVAL_ROLE", "GAMMA_SOURCE_ROLE", "FoldLogits", "FoldLogitsWriter", "LogitSplit", "SweepLogits",
    "SweepLogitsWriter", "fold_logits_writer", "open_fold_logits", "open_sweep_logits", "read_sweep_logits",
    "sweep_logits_writer",
]
