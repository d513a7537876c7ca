"""Data parallelism with ``torch.distributed``: the process group one run trains in, and the launcher of its ranks.

A run on k devices is k processes (ranks), started by :func:`spawn` (``torch.multiprocessing``, a TCP rendezvous on
127.0.0.1: one node) with the gloo backend on CPU and NCCL on CUDA (rank r uses ``cuda:r``). Every rank builds the
same model from the same seed and reads its own share of each step's batch (:func:`robustft.training.data.epoch_order`
with ``rank``/``world_size``); the trainer sums the ranks' gradients with :meth:`Group.all_reduce_` (each rank's
contribution is already weighted by its share of the step), so the ranks stay bit-identical to one another.
:data:`SINGLE` is the group of a one-process run: every collective is then a no-op.
"""

from __future__ import annotations

import logging
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


@dataclass(frozen=True)
class Group:
    """Rank ``rank`` of ``world_size`` processes; collectives run on ``device`` (NCCL needs CUDA tensors)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside [0, {self.world_size})")

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that writes checkpoints and outputs."""
        return self.rank == 0

    def shard(self, order: Tensor) -> Tensor:
        """This rank's rows of ``order``: every ``world_size``-th from the ``rank``-th on (disjoint, covering)."""
        return order[self.rank :: self.world_size]

    def counts(self, total: int) -> list[int]:
        """How many of ``total`` consecutive positions each rank holds under :meth:`shard`."""
        return [len(range(r, total, self.world_size)) for r in range(self.world_size)]

    def all_reduce_(self, tensors: Sequence[Tensor]) -> None:
        """Sum each tensor over the ranks, in place, in one flattened float32 buffer."""
        if not self.parallel or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float32) for t in tensors])
        dist.all_reduce(flat)
        start = 0
        for t in tensors:
            t.copy_(flat[start : start + t.numel()].view_as(t))
            start += t.numel()

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum ``.grad`` over the ranks; a parameter without a gradient on every rank keeps none (as AdamW expects)."""
        if not self.parallel:
            return
        has = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        self.all_reduce_([has, *grads])
        for p, g, flag in zip(params, grads, has.tolist()):
            p.grad = g if flag > 0 else None

    def all_gather_rows(self, tensor: Tensor, counts: Sequence[int]) -> Tensor:
        """The ranks' ``tensor`` s (rank r's has ``counts[r]`` rows) concatenated in rank order."""
        if not self.parallel:
            return tensor
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[: len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def sum_scalars(self, values: dict[str, float]) -> dict[str, float]:
        """``values`` summed over the ranks key by key (a key missing on a rank counts 0), in rank order."""
        if not self.parallel:
            return dict(values)
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, values)
        keys = list(dict.fromkeys(k for part in gathered for k in part))
        return {k: sum(part.get(k, 0.0) for part in gathered) for k in keys}

    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Copy rank 0's ``tensors`` into every rank's, in place."""
        if not self.parallel:
            return
        for t in tensors:
            buffer = t.detach().to(self.device)
            dist.broadcast(buffer, 0)
            if buffer is not t:
                t.data.copy_(buffer)

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier()


SINGLE = Group()


def backend_for(device: str | torch.device) -> str:
    """gloo on CPU, NCCL on CUDA."""
    kind = torch.device(device).type
    if kind not in BACKENDS:
        raise ValueError(f"data parallel: no backend for device {str(device)!r}; allowed: {sorted(BACKENDS)}")
    return BACKENDS[kind]


def rank_device(device: torch.device, rank: int) -> torch.device:
    """The device of rank ``rank``: ``cuda:rank`` on CUDA (one GPU a rank), the CPU otherwise."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_logging(rank: int) -> None:
    """Rank 0's ``robustft`` log lines (progress, notes) to stderr, which the job's log holds; other ranks: warnings."""
    logger = logging.getLogger("robustft")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [rank {rank}] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _rank_entry(rank: int, fn: Callable[..., Any], world_size: int, device: str, port: int, threads: int | None,
                args: tuple) -> None:
    _rank_logging(rank)
    dev = rank_device(torch.device(device), rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if threads:
        torch.set_num_threads(threads)
    dist.init_process_group(backend_for(dev), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        fn(Group(rank, world_size, dev), *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int, args: tuple = (), *, device: str | torch.device = "cpu",
          threads: int | None = None) -> None:
    """Run ``fn(group, *args)`` in ``world_size`` new processes, one a rank, on one node; waits for all of them.

    ``fn`` and ``args`` must pickle (a module-level function). ``device``: cpu (gloo) or cuda (NCCL, rank r on
    ``cuda:r``; needs ``world_size`` visible GPUs). ``threads``: torch CPU threads of each rank. A rank that raises
    stops the others and re-raises here (``torch.multiprocessing.ProcessRaisedException``).
    """
    device = torch.device(device)
    if world_size < 1:
        raise ValueError(f"devices: expected at least 1, got {world_size}")
    if device.type == "cuda" and torch.cuda.device_count() < world_size:
        raise RuntimeError(f"devices: {world_size} ranks on CUDA but {torch.cuda.device_count()} GPUs are visible")
    torch.multiprocessing.spawn(_rank_entry, args=(fn, world_size, str(device.type), free_port(), threads, args),
                                nprocs=world_size, join=True)


__all__ = ["BACKENDS", "Group", "SINGLE", "backend_for", "free_port", "rank_device", "spawn"]
