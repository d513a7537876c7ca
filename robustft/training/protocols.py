"""Which training examples a protocol keeps: pure functions on label arrays, returning sorted row positions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class ProtocolSelection:
    """Rows of the ID train split to train on, and the classes fine-tuning never sees (the head keeps them all)."""

    kind: str
    train_indices: np.ndarray
    absent_classes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def seen_class_mask(self, class_names: Sequence[str]) -> np.ndarray:
        absent = set(self.absent_classes)
        return np.array([c not in absent for c in class_names], dtype=bool)

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params, "absent_classes": list(self.absent_classes),
                "n_train": int(len(self.train_indices))}


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    return np.bincount(labels, minlength=num_classes)


def select_full(labels: np.ndarray) -> np.ndarray:
    """Every row."""
    return np.arange(len(labels), dtype=np.int64)


def select_kshot(labels: np.ndarray, class_names: Sequence[str], k: int, seed: int) -> np.ndarray:
    """k rows per class drawn without replacement with a generator seeded by ``seed`` (classes in label order).

    Raises ``ValueError`` naming the first class with fewer than k examples.
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"protocol.k: expected a positive integer, got {k!r}")
    labels = np.asarray(labels)
    counts = class_counts(labels, len(class_names))
    for c, name in enumerate(class_names):
        if counts[c] < k:
            raise ValueError(f"kshot: class {name!r} has {counts[c]} training examples, fewer than k={k}")
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c in range(len(class_names))]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def select_class_subset(labels: np.ndarray, class_names: Sequence[str], absent_classes: Sequence[str]) -> np.ndarray:
    """Rows whose class is not in ``absent_classes``; ``ValueError`` for an unknown name or a seen class with no rows."""
    unknown = [c for c in absent_classes if c not in class_names]
    if unknown:
        raise ValueError(f"class_subset: unknown absent classes {unknown}; classes: {list(class_names)}")
    labels = np.asarray(labels)
    counts = class_counts(labels, len(class_names))
    absent = set(absent_classes)
    for c, name in enumerate(class_names):
        if name not in absent and counts[c] == 0:
            raise ValueError(f"class_subset: seen class {name!r} has no training examples")
    if len(absent) == len(class_names):
        raise ValueError("class_subset: every class is absent; nothing to train on")
    keep = np.array([name not in absent for name in class_names], dtype=bool)
    return np.flatnonzero(keep[labels]).astype(np.int64)


def select_protocol(
    protocol: Mapping[str, Any], labels: np.ndarray, class_names: Sequence[str], seed: int
) -> ProtocolSelection:
    """Apply the config's ``protocol`` mapping to the ID-train labels.

    Keys: ``kind`` (full | kshot | class_subset), ``k`` and optional ``seed`` (kshot; default: the run's seed),
    ``absent_classes`` (class_subset). Keys of other kinds are ignored (schema defaults fill them in), except a
    non-empty ``absent_classes`` outside class_subset, which is an error.
    """
    protocol = dict(protocol)
    kind = protocol.pop("kind", "full")
    kinds = ("full", "kshot", "class_subset")
    if kind not in kinds:
        raise ValueError(f"protocol.kind: unknown protocol {kind!r}; allowed: {list(kinds)}")
    extra = set(protocol) - {"k", "seed", "absent_classes"}
    if extra:
        raise ValueError(f"protocol {kind!r}: unknown keys {sorted(extra)}; allowed: ['absent_classes', 'k', 'seed']")
    if kind != "class_subset" and protocol.get("absent_classes"):
        raise ValueError(f"protocol {kind!r}: absent_classes only applies to kind class_subset")
    labels = np.asarray(labels)
    if kind == "full":
        return ProtocolSelection(kind, select_full(labels))
    if kind == "kshot":
        if "k" not in protocol:
            raise ValueError("protocol kshot: key 'k' (images per class) is required")
        k_seed = int(protocol.get("seed", seed))
        indices = select_kshot(labels, class_names, protocol["k"], k_seed)
        return ProtocolSelection(kind, indices, params={"k": int(protocol["k"]), "seed": k_seed})
    absent = protocol.get("absent_classes")
    if not absent or isinstance(absent, str):
        raise ValueError("protocol class_subset: 'absent_classes' must be a non-empty list of class names")
    indices = select_class_subset(labels, class_names, list(absent))
    ordered = [c for c in class_names if c in set(absent)]
    return ProtocolSelection(kind, indices, absent_classes=ordered)
