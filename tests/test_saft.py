"""SAFT (Nam et al. 2024): the selected parameters, and only they, change; the stored sparse update rebuilds them."""

from __future__ import annotations

import torch

from test_methods import reference_model, run, state_of, train_directly  # noqa: E402


def test_saft_changes_only_its_mask_of_the_configured_fraction(tmp_path):
    fraction = 0.05
    method, result, _ = train_directly("saft", {"fraction": fraction, "select": "last"})
    reference = reference_model().state_dict()
    trained = result.model.state_dict()
    total = sum(p.numel() for p in reference_model().parameters())
    assert sum(int(m.sum()) for m in method.masks.values()) == round(fraction * total)
    changed = 0
    for key, value in reference.items():
        mask = method.masks.get(key, torch.zeros_like(value, dtype=torch.bool))
        assert torch.equal(trained[key][~mask], value[~mask]), key  # outside the mask: bit-identical (buffers too)
        changed += int((trained[key][mask] != value[mask]).sum())
    assert changed > 0

    record = run("saft", tmp_path / "run", {"fraction": fraction, "select": "last"})
    assert record["trainable_parameters"] == round(fraction * total)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.json", "sparse_update.safetensors",
                                                                     "train_log.parquet"]
    stored = state_of(tmp_path / "run")
    for key in reference:
        assert torch.equal(stored[key], trained[key]), key  # the sparse file rebuilds the trained model exactly



def test_saft_top_fraction_masks_pick_the_global_largest_scores():
    from robustft.methods.saft import top_fraction_masks

    scores = {"a": torch.tensor([[0.1, 0.9], [0.3, 0.2]]), "b": torch.tensor([0.8, 0.05, 0.7, 0.0])}
    masks = top_fraction_masks(scores, 0.25)  # 8 entries -> 2 largest: 0.9 (a) and 0.8 (b)
    assert masks["a"].tolist() == [[False, True], [False, False]]
    assert masks["b"].tolist() == [True, False, False, False]
    assert int(top_fraction_masks(scores, 1e-6)["a"].sum()) == 1  # at least one entry
