"""Model soups (Wortsman et al. 2022, ``mlfoundations/model-soups`` ``main.py``): weight averages of fine-tuned runs
that share one reference model.

- **uniform**: the mean of every ingredient's state dict;
- **greedy**: the ingredients sorted by ID-validation accuracy (best first); the soup starts from the best one and
  each next one is kept only if the soup with it has strictly higher ID-validation accuracy (model-soups' ``>``).

State dicts are averaged one at a time into a float64 running sum (memory: the sum and one ingredient, never all of
them); float64 makes the soup of identical runs bit-identical to the run. Non-floating entries (BatchNorm's
``num_batches_tracked``) are not averaged: they come from the first ingredient.

Importing this module is cheap (no torch): the workflow reads :func:`soup_table` at parse time.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from robustft.config import resolved_variant, variant_protocol

if TYPE_CHECKING:
    from torch import Tensor

KINDS = ("uniform", "greedy")
#: The source name of a soup over several methods' runs (``soups.mixed``).
MIXED = "mixed"
#: A soup is one model: its rows in the summary carry this seed.
SOUP_SEED = 0


def soup_method(kind: str) -> str:
    """The ``method`` of a soup's rows: ``uniform_soup`` or ``greedy_soup``."""
    return f"{kind}_soup"


def is_soup(record: Mapping[str, Any]) -> bool:
    """Whether a run record (run.json) is a soup's."""
    return "soup" in record


# ------------------------------------------------------------------------------------------------ which soups
def _run_name(run: Mapping[str, Any]) -> str:
    return f"{run['method']}/{run['variant']}/seed{run['seed']}"


def soup_table(config: dict, studies: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every soup a validated config asks for: per study, per kind, one soup per method of ``soups.methods`` and one
    over the methods of ``soups.mixed`` together (source ``mixed``).

    Ingredients: the seeds and variants of the source methods in the study that share the protocol of the first of
    them (in config order); a variant with another protocol (e.g. a class-subset variant beside full ones) is left
    out, named in ``left_out``. A soup needs at least two ingredients; otherwise it is not built. Each row:
    ``study``, ``dataset``, ``backbone``, ``kind``, ``method`` (``<kind>_soup``), ``source`` (the method, or
    ``mixed``), ``seed``, ``protocol``, ``ingredients`` (run rows: method, variant, seed) and ``left_out``.
    """
    settings = config.get("soups") or {}
    if not settings.get("enabled", False):
        return []
    sources = [(m, [m]) for m in settings.get("methods", [])]
    if settings.get("mixed"):
        sources.append((MIXED, list(settings["mixed"])))
    table = []
    for study in studies:
        for source, methods in sources:
            runs, left_out, protocol = [], [], None
            for method in methods:
                for variant in study["methods"].get(method, []):
                    this = variant_protocol(resolved_variant(config, method, variant))
                    protocol = this if protocol is None else protocol
                    rows = [{"method": method, "variant": variant, "seed": seed} for seed in config["seeds"]]
                    if this == protocol:
                        runs += rows
                    else:
                        left_out += [{**row, "reason": f"protocol {this} differs from the soup's {protocol}"}
                                     for row in rows]
            if len(runs) < 2:
                continue
            for kind in settings.get("kinds", KINDS):
                table.append({"study": study["study"], "dataset": study["dataset"], "backbone": study["backbone"],
                              "kind": kind, "method": soup_method(kind), "source": source, "seed": SOUP_SEED,
                              "protocol": copy.deepcopy(protocol), "ingredients": copy.deepcopy(runs),
                              "left_out": copy.deepcopy(left_out)})
    return table


# --------------------------------------------------------------------------------------------- averaging weights
class RunningMean:
    """The mean of state dicts added one at a time (a float64 running sum; non-float entries from the first)."""

    def __init__(self) -> None:
        self.count = 0
        self._sum: dict[str, Tensor] = {}
        self._dtypes: dict[str, Any] = {}

    def add(self, state: Mapping[str, "Tensor"]) -> None:
        import torch

        if self.count and set(state) != set(self._sum):
            missing, extra = sorted(set(self._sum) - set(state)), sorted(set(state) - set(self._sum))
            raise ValueError(f"soup ingredient {self.count + 1}: keys differ (missing {missing[:3]}, extra {extra[:3]})")
        for key, value in state.items():
            value = value.detach().cpu()
            if not self.count:
                self._dtypes[key] = value.dtype
                self._sum[key] = value.to(torch.float64).clone() if value.is_floating_point() else value.clone()
                continue
            if value.shape != self._sum[key].shape:
                raise ValueError(f"soup ingredient {self.count + 1}: {key!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(self._sum[key].shape)}")
            if value.is_floating_point():
                self._sum[key] += value.to(torch.float64)
        self.count += 1

    def mean(self, extra: Mapping[str, "Tensor"] | None = None) -> dict[str, "Tensor"]:
        """The mean state dict, in the ingredients' dtypes; ``extra``: one more state counted in (greedy's candidate
        soup) without adding it."""
        import torch

        count = self.count + (extra is not None)
        if not count:
            raise ValueError("a soup needs at least one ingredient")
        out = {}
        for key, total in self._sum.items():
            if not total.is_floating_point():
                out[key] = total.clone() if self.count else extra[key].detach().cpu().clone()
                continue
            if extra is not None:
                total = total + extra[key].detach().cpu().to(torch.float64)
            out[key] = (total / count).to(self._dtypes[key])
        return out


def uniform_soup(states: Iterable[Mapping[str, "Tensor"]]) -> dict[str, "Tensor"]:
    """The mean of the state dicts (read one at a time: pass a generator to keep one in memory)."""
    mean = RunningMean()
    for state in states:
        mean.add(state)
    return mean.mean()


def greedy_soup(
    names: Sequence[str],
    load: Callable[[str], Mapping[str, "Tensor"]],
    accuracy: Callable[[Mapping[str, "Tensor"]], float],
) -> tuple[dict[str, "Tensor"], list[dict[str, Any]]]:
    """Greedy soup (model-soups ``main.py``): ``load(name)`` gives an ingredient's state dict, ``accuracy(state)``
    its ID-validation accuracy.

    Returns the soup and one record per ingredient, in the order tried: ``run``, ``val_accuracy`` (alone),
    ``soup_val_accuracy`` (of the soup with it, best first: the ingredient alone), ``kept``. Sorted by accuracy
    alone, best first (ties: the order given); a candidate is kept only if it strictly improves the soup.
    """
    if not names:
        raise ValueError("a greedy soup needs at least one ingredient")
    alone = {name: float(accuracy(load(name))) for name in names}
    order = sorted(names, key=lambda n: -alone[n])  # stable: ties keep the order given
    mean = RunningMean()
    mean.add(load(order[0]))
    best = alone[order[0]]
    steps = [{"run": order[0], "val_accuracy": best, "soup_val_accuracy": best, "kept": True}]
    for name in order[1:]:
        state = load(name)
        score = float(accuracy(mean.mean(extra=state)))
        kept = score > best
        if kept:
            mean.add(state)
            best = score
        steps.append({"run": name, "val_accuracy": alone[name], "soup_val_accuracy": score, "kept": kept})
    return mean.mean(), steps


def load_soup_state(run_dir, reference_state: Mapping[str, "Tensor"]) -> dict[str, "Tensor"]:
    """A soup's full ``ImageClassifier`` state dict (its ``model.safetensors``), checked against the reference's keys."""
    from pathlib import Path

    from robustft.methods.base import check_same_keys, load_checkpoint_file

    path = Path(run_dir) / SOUP_FILE
    state = load_checkpoint_file(path)
    check_same_keys(reference_state, state, path)
    return state


#: The file a soup's run directory stores (a full state dict, as full_ft's).
SOUP_FILE = "model.safetensors"
