import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustft.fisher import diagonal_fisher, ewc_penalty, l1_to_anchor, l2_to_anchor


def _linear(in_features: int, out_features: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def test_fisher_of_uniform_two_class_model_is_quarter_of_mean_square_input():
    # Zero weights give p = (1/2, 1/2) for every x, so d log p_y / dW_k = (1[y=k] - 1/2) x and its square is
    # x^2 / 4 whatever label is sampled: F_W[k, j] = mean(x_j^2) / 4 and F_b[k] = 1/4.
    model = nn.Linear(3, 2)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, -2.0, 1.0]])
    fisher = diagonal_fisher(model, [x], generator=torch.Generator().manual_seed(0))
    expected_row = torch.tensor([(1 + 9) / 2, (4 + 4) / 2, (0 + 1) / 2]) / 4
    assert torch.allclose(fisher["weight"], expected_row.expand(2, 3))
    assert torch.allclose(fisher["bias"], torch.full((2,), 0.25))


def test_fisher_matches_hand_gradients_with_replayed_label_draws():
    model = _linear(4, 3, seed=0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(3, 4, generator=g), torch.randn(2, 4, generator=g)]
    fisher = diagonal_fisher(model, batches, generator=torch.Generator().manual_seed(7))

    replay = torch.Generator().manual_seed(7)
    gw, gb = torch.zeros(3, 4), torch.zeros(3)
    with torch.no_grad():
        for x in torch.cat(batches):
            log_p = F.log_softmax(model(x[None]), dim=-1)
            y = torch.multinomial(log_p.exp(), 1, generator=replay).item()
            residual = F.one_hot(torch.tensor(y), 3).float() - log_p.exp()[0]  # d log p_y / d logits
            gw += torch.outer(residual, x) ** 2
            gb += residual**2
    assert torch.allclose(fisher["weight"], gw / 5)
    assert torch.allclose(fisher["bias"], gb / 5)


def test_fisher_is_deterministic_batching_invariant_and_respects_options():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.ReLU(), nn.Linear(5, 3))
    model.train()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    whole = diagonal_fisher(model, [x], generator=torch.Generator().manual_seed(3))
    split = diagonal_fisher(model, [x[:2], x[2:]], generator=torch.Generator().manual_seed(3))
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    assert whole.keys() == {"0.weight", "0.bias", "3.weight", "3.bias"}
    for k in whole:
        assert torch.equal(whole[k], split[k])  # dropout off (eval mode) and same draw order

    head = {"3.weight": model[3].weight}
    first_two = diagonal_fisher(model, [x], params=head, generator=torch.Generator().manual_seed(3), max_examples=2)
    only_two = diagonal_fisher(model, [x[:2]], params=head, generator=torch.Generator().manual_seed(3))
    assert first_two.keys() == {"3.weight"}
    assert torch.equal(first_two["3.weight"], only_two["3.weight"])
    all_params = diagonal_fisher(model, [x[:2]], generator=torch.Generator().manual_seed(3))
    assert torch.equal(first_two["3.weight"], all_params["3.weight"])


def test_fisher_unused_parameter_is_zero_and_empty_input_raises():
    model = _linear(2, 2, seed=1)
    unused = nn.Parameter(torch.ones(3))
    fisher = diagonal_fisher(model, [torch.ones(1, 2)], params={"weight": model.weight, "unused": unused})
    assert torch.equal(fisher["unused"], torch.zeros(3))
    assert fisher["weight"].sum() > 0
    with pytest.raises(ValueError, match="no examples"):
        diagonal_fisher(model, [])


def test_ewc_penalty_value_zero_at_anchor_and_gradient():
    anchor = {"w": torch.tensor([1.0, -1.0, 0.5]), "b": torch.tensor([2.0])}
    fisher = {"w": torch.tensor([2.0, 0.0, 4.0]), "b": torch.tensor([1.0])}
    at_anchor = {k: v.clone().requires_grad_() for k, v in anchor.items()}
    assert ewc_penalty(at_anchor, anchor, fisher, 3.0).item() == 0.0

    params = {"w": torch.tensor([2.0, 5.0, 0.0], requires_grad=True), "b": torch.tensor([1.0], requires_grad=True)}
    penalty = ewc_penalty(params, anchor, fisher, 3.0)
    # 3/2 * (2*1^2 + 0*6^2 + 4*0.5^2 + 1*1^2) = 1.5 * 4 = 6
    assert penalty.item() == pytest.approx(6.0)
    penalty.backward()
    for k in params:  # d/dθ = λ F (θ - θ0)
        assert torch.allclose(params[k].grad, 3.0 * fisher[k] * (params[k].detach() - anchor[k]))


def test_l2_and_l1_to_anchor_hand_computed():
    anchor = {"w": torch.tensor([[1.0, 2.0], [0.0, -1.0]]), "b": torch.tensor([0.5])}
    params = {
        "w": torch.tensor([[2.0, 0.0], [0.0, 2.0]], requires_grad=True),
        "b": torch.tensor([0.0], requires_grad=True),
    }
    # differences: w -> [1, -2, 0, 3], b -> [-0.5]
    assert l2_to_anchor(params, anchor).item() == pytest.approx(1 + 4 + 0 + 9 + 0.25)
    assert l1_to_anchor(params, anchor).item() == pytest.approx(1 + 2 + 0 + 3 + 0.5)
    l2_to_anchor(params, anchor).backward()
    assert torch.allclose(params["b"].grad, torch.tensor([-1.0]))  # 2 (θ - θ0)
    with pytest.raises(ValueError, match="b"):
        l1_to_anchor(params, {"w": anchor["w"]})
