"""Training data read by rows, from memory or from the HDF5 caches, a block of batches at a time.

Order: an epoch visits the rows of a split in a seeded permutation (:func:`epoch_order`). The rows of a block of
consecutive batches of that permutation are read in ascending order (runs of consecutive rows as one slice,
:func:`robustft.io.arrays.take_rows`) and put back into permutation order in memory. The batches therefore hold
exactly the rows, in exactly the order, of the permutation: sorting changes how the disk is read, never which
example lands in which step. A helper thread reads the next block while the current one trains
(:func:`robustft.io.prefetch.prefetched`). Memory holds the labels (8 bytes a row) and a few blocks of
:data:`READ_BLOCK_BYTES`, whatever the size of the split.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from robustft.io.prefetch import prefetched

#: Bytes of inputs read at once: a block of consecutive batches (at least one batch). A block is read in row order.
READ_BLOCK_BYTES = 16 << 20
#: Blocks a helper thread reads ahead of the one training (memory: about this many + 2 blocks).
READ_AHEAD_BLOCKS = 1
COLUMNS = ("pixels", "features")


class RowReader(Protocol):
    """Rows of one array (uint8 pixels (N, H, W, 3) or features (N, D)), read by row lists in any order."""

    def __len__(self) -> int: ...

    @property
    def row_bytes(self) -> int: ...

    def take(self, rows: np.ndarray) -> Any: ...


class TensorRows:
    """The :class:`RowReader` of an array already in memory (tests, benchmarks, small data)."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor

    def __len__(self) -> int:
        return int(self.tensor.shape[0])

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.tensor.shape[1:], dtype=np.int64)) * self.tensor.element_size()

    def take(self, rows: np.ndarray) -> Tensor:
        return self.tensor[torch.from_numpy(np.asarray(rows, dtype=np.int64))]


@dataclass
class Split:
    """Labels in memory and the inputs a method may use, read by rows: uint8 ``pixels`` and/or cached ``features``.

    ``pixels`` / ``features``: tensors held in memory (tests, small data), or :class:`RowReader` s that read rows
    from disk (an HDF5 column: ``robustft.io.arrays.ColumnReader``). ``positions``: the readers' row of each of this
    split's rows (None: row i is row i); :meth:`rows` selects rows without reading any.
    """

    labels: Tensor
    pixels: RowReader | Tensor | None = None
    features: RowReader | Tensor | None = None
    positions: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels).long()
        if self.positions is not None:
            self.positions = np.asarray(self.positions, dtype=np.int64)
            if len(self.positions) != len(self.labels):
                raise ValueError(f"split: {len(self.positions)} positions for {len(self.labels)} labels")
        for name in COLUMNS:
            source = getattr(self, name)
            if source is None:
                continue
            if isinstance(source, Tensor) or self.positions is None:
                if len(source) != len(self.labels):
                    raise ValueError(f"split: {name} has {len(source)} rows, labels {len(self.labels)}")
            elif len(self.positions) and self.positions.max() >= len(source):
                raise ValueError(f"split: a position lies beyond the {len(source)} rows of {name}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def rows(self, indices: np.ndarray | Tensor) -> "Split":
        """The split of rows ``indices`` of this one: tensors are indexed, readers shared (nothing is read)."""
        idx = np.asarray(indices, dtype=np.int64)
        pick = torch.from_numpy(idx)
        sources = [getattr(self, c) for c in COLUMNS]
        readers = any(s is not None and not isinstance(s, Tensor) for s in sources)
        positions = None if not readers else idx if self.positions is None else self.positions[idx]
        subset = [s[pick] if isinstance(s, Tensor) else s for s in sources]
        return Split(self.labels[pick], *subset, positions=positions)

    def reader(self, column: str) -> RowReader:
        """The rows of ``column`` as a :class:`RowReader` (a tensor is wrapped in :class:`TensorRows`)."""
        if column not in COLUMNS:
            raise ValueError(f"split: unknown column {column!r}; allowed: {list(COLUMNS)}")
        source = getattr(self, column)
        if source is None:
            what = "images" if column == "pixels" else "cached features"
            raise ValueError(f"this method reads {what} ({column}) but none were given")
        return TensorRows(source) if isinstance(source, Tensor) else source

    def take(self, column: str, rows: np.ndarray) -> Tensor:
        """``column`` of rows ``rows`` of this split (a CPU tensor, rows in the given order)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.positions is not None and not isinstance(getattr(self, column), Tensor):
            rows = self.positions[rows]
        return torch.as_tensor(self.reader(column).take(rows))


def epoch_order(n: int, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> Tensor:
    """The rows of one epoch: the seeded permutation ``torch.randperm(n, generator=generator)``.

    With ``world_size`` > 1 (data parallelism, not used yet) rank ``rank`` takes every ``world_size``-th row of the
    permutation from its ``rank``-th on, as torch's ``DistributedSampler`` (without its padding): the ranks' shares
    are disjoint and together are the permutation.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    return torch.randperm(n, generator=generator)[rank::world_size]


def block_rows(batch_size: int, row_bytes: int, budget: int = READ_BLOCK_BYTES) -> int:
    """Rows read at once: the most whole batches whose inputs fit in ``budget`` bytes, at least one batch."""
    return batch_size * max(1, budget // max(1, batch_size * row_bytes))


class Loaded(NamedTuple):
    """One batch as read: its rows (positions in the split), labels and the columns asked for, on the CPU."""

    rows: Tensor
    labels: Tensor
    columns: dict[str, Tensor]


def read_batches(
    split: Split,
    order: Tensor,
    batch_size: int,
    columns: Sequence[str],
    *,
    first_batch: int = 0,
    block_bytes: int = READ_BLOCK_BYTES,
    read_ahead: int = READ_AHEAD_BLOCKS,
    pin: bool = False,
) -> Iterator[Loaded]:
    """The batches of ``order`` (rows of ``split``) from batch ``first_batch`` on, each as ``order`` lists them.

    Reads a block of consecutive batches at a time (:func:`block_rows`), ``read_ahead`` blocks ahead in a helper
    thread (0: inline); ``pin``: the helper also copies each block into pinned memory, for non-blocking copies to CUDA.
    """
    readers = [split.reader(c) for c in columns]
    row_bytes = sum(r.row_bytes for r in readers)
    per_block = block_rows(batch_size, row_bytes, block_bytes)

    def blocks() -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        for start in range(first_batch * batch_size, len(order), per_block):
            rows = order[start : start + per_block]
            yield rows, {c: split.take(c, rows.numpy()) for c in columns}

    def pinned(block: tuple[Tensor, dict[str, Tensor]]) -> tuple[Tensor, dict[str, Tensor]]:
        return block[0], {c: t.pin_memory() for c, t in block[1].items()}

    with contextlib.closing(prefetched(blocks(), read_ahead, pinned if pin else None)) as ready:
        for rows, data in ready:
            for i in range(0, len(rows), batch_size):
                batch_rows = rows[i : i + batch_size]
                yield Loaded(batch_rows, split.labels[batch_rows], {c: t[i : i + batch_size] for c, t in data.items()})


__all__ = ["COLUMNS", "Loaded", "READ_BLOCK_BYTES", "RowReader", "Split", "TensorRows", "block_rows", "epoch_order",
           "read_batches"]
