"""Model soups (robustft.soups): the defining properties of the uniform and greedy soups, and which soups a config
asks for."""

from __future__ import annotations

import pytest
import torch

from robustft.config import ConfigError, study_table, validate_config
from robustft.soups import RunningMean, greedy_soup, soup_table, uniform_soup


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"encoder.w": torch.randn(5, 3, generator=g), "head.weight": torch.randn(4, 5, generator=g),
            "head.bias": torch.randn(4, generator=g), "encoder.bn.num_batches_tracked": torch.tensor(7 + seed)}


def test_a_soup_of_identical_runs_is_the_run():
    run = _state(0)
    for n in (2, 3, 7):
        soup = uniform_soup(dict(run) for _ in range(n))
        for key, value in run.items():
            assert torch.equal(soup[key], value) and soup[key].dtype == value.dtype, key
    soup, steps = greedy_soup(["a", "b", "c"], lambda name: run, lambda state: 0.5)
    assert all(torch.equal(soup[k], v) for k, v in run.items())
    assert [s["kept"] for s in steps] == [True, False, False]  # equal accuracy is no improvement (model-soups ``>``)


def test_uniform_soup_is_the_mean_of_the_state_dicts():
    states = [_state(s) for s in range(4)]
    soup = uniform_soup(iter(states))
    for key in ("encoder.w", "head.weight", "head.bias"):
        expected = torch.stack([s[key] for s in states]).double().mean(0).float()
        assert torch.equal(soup[key], expected), key
    assert int(soup["encoder.bn.num_batches_tracked"]) == 7  # non-float entries: from the first ingredient


def test_running_mean_reads_one_state_at_a_time_and_refuses_other_keys():
    mean = RunningMean()
    mean.add(_state(0))
    candidate = mean.mean(extra=_state(1))
    assert mean.count == 1  # the candidate was counted in, not added
    assert torch.allclose(candidate["head.bias"], (_state(0)["head.bias"] + _state(1)["head.bias"]) / 2)
    with pytest.raises(ValueError, match="keys differ"):
        mean.add({"head.bias": torch.zeros(4)})
    with pytest.raises(ValueError, match="shape"):
        mean.add({**_state(2), "head.bias": torch.zeros(5)})


def _linear_accuracy(x: torch.Tensor, y: torch.Tensor):
    def accuracy(state) -> float:
        return float(((x @ state["w"].T).argmax(1) == y).float().mean())
    return accuracy


def test_greedy_soup_keeps_a_run_only_if_id_validation_accuracy_improves():
    # A linear classifier on 2-D points of 2 classes (x0 > 0 -> class 1). "a" (direction (1, 1)) and "b" ((1, -1))
    # each err where x1 dominates, and their mean ((1, 0)) is exact; "c" ((-1, 6)) is worse alone and pulls the soup
    # off the boundary: it is rejected.
    x = torch.tensor([[1.0, 0.3], [2.0, -0.3], [-1.0, 0.2], [-2.0, -0.2], [0.5, -1.0], [0.5, 1.0], [-0.5, -1.0]])
    y = (x[:, 0] > 0).long()
    runs = {
        "a": {"w": torch.tensor([[0.0, 0.0], [1.0, 1.0]])},
        "b": {"w": torch.tensor([[0.0, 0.0], [1.0, -1.0]])},
        "c": {"w": torch.tensor([[0.0, 0.0], [-1.0, 6.0]])},
    }
    accuracy = _linear_accuracy(x, y)
    alone = {name: accuracy(state) for name, state in runs.items()}
    assert alone["a"] > alone["b"] and alone["c"] < alone["b"]  # the order greedy tries them: a, b, c
    soup, steps = greedy_soup(["c", "b", "a"], runs.__getitem__, accuracy)
    assert [s["run"] for s in steps] == ["a", "b", "c"]  # sorted by ID-val accuracy, best first
    assert [s["kept"] for s in steps] == [True, True, False]
    assert steps[1]["soup_val_accuracy"] == 1.0 > alone["a"]
    assert steps[2]["soup_val_accuracy"] < 1.0  # adding c would have hurt
    assert torch.equal(soup["w"], (runs["a"]["w"].double() + runs["b"]["w"].double()).div(2).float())
    assert accuracy(soup) == 1.0
    # the uniform soup of all three keeps c
    assert accuracy(uniform_soup(runs.values())) < 1.0


def _config(**soups) -> dict:
    return validate_config({
        "seeds": [0, 1],
        "methods": {"zeroshot": {"default": {}}, "full_ft": {"default": {}, "sub": {
            "protocol": {"kind": "class_subset", "absent_classes": ["house"]}}}, "lp_ft": {"default": {}},
            "l2sp": {"default": {}}},
        "soups": soups,
    })


def test_soup_table_groups_runs_of_one_protocol_and_needs_two_of_them():
    config = _config(methods=["full_ft", "lp_ft"], mixed=["full_ft", "l2sp"])
    table = soup_table(config, study_table(config))
    assert {(s["kind"], s["source"]) for s in table} == {(k, s) for k in ("uniform", "greedy")
                                                         for s in ("full_ft", "lp_ft", "mixed")}
    full = next(s for s in table if s["source"] == "full_ft" and s["kind"] == "greedy")
    assert full["method"] == "greedy_soup" and full["protocol"] == {"kind": "full"}
    assert full["ingredients"] == [{"method": "full_ft", "variant": "default", "seed": 0},
                                   {"method": "full_ft", "variant": "default", "seed": 1}]
    assert [(r["variant"], r["seed"]) for r in full["left_out"]] == [("sub", 0), ("sub", 1)]
    mixed = next(s for s in table if s["source"] == "mixed")
    assert {(r["method"], r["seed"]) for r in mixed["ingredients"]} == {(m, s) for m in ("full_ft", "l2sp")
                                                                        for s in (0, 1)}
    one_seed = validate_config({**config, "seeds": [0], "soups": {"methods": ["lp_ft"], "mixed": []}})
    assert soup_table(one_seed, study_table(one_seed)) == []  # one run: nothing to average
    assert soup_table(_config(enabled=False), study_table(config)) == []


def test_zeroshot_cannot_be_souped():  # it trains nothing: its run is the reference model
    with pytest.raises(ConfigError, match="soups.methods.0: 'zeroshot' is not allowed"):
        _config(methods=["zeroshot"])
