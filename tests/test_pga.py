"""Projected gradient ascent (algorithms/pga.py; Halimi et al., arXiv:2207.05521, Sec. 3)
on its own: the pieces on toy tensors, recomputed by hand. The whole unlearning step
inside the protocol is recomputed in tests/test_fcu_reference.py."""
import math

import pytest
import torch

from algorithms import pga


def test_reference_model_is_the_aggregate_without_the_client():
    """w_ref = (n w_o - n_u w_u) / (n - n_u); integer tensors from w_o; running
    variances clipped at 0."""
    w_o = {"w": torch.tensor([1.0, 2.0]), "bn.running_var": torch.tensor([0.1, 1.0]),
           "bn.num_batches_tracked": torch.tensor(7)}
    w_u = {"w": torch.tensor([3.0, -1.0]), "bn.running_var": torch.tensor([2.0, 0.5]),
           "bn.num_batches_tracked": torch.tensor(9)}
    ref = pga.reference_model(w_o, w_u, 10, 4)
    assert ref["w"].tolist() == pytest.approx([(10 - 12) / 6, (20 + 4) / 6])
    assert ref["bn.running_var"].tolist() == pytest.approx([0.0, (10 - 2) / 6])
    assert ref["bn.num_batches_tracked"] == 7


def test_radius_is_the_share_of_the_mean_distance_over_the_keys():
    ref = {"a": torch.zeros(2), "b": torch.zeros(1), "skip": torch.zeros(1)}
    rand = [{"a": torch.tensor([3.0, 4.0]), "b": torch.zeros(1), "skip": torch.ones(1)},
            {"a": torch.zeros(2), "b": torch.tensor([1.0]), "skip": torch.ones(1)}]
    assert pga.radius(ref, ["a", "b"], iter(rand), 0.5) == pytest.approx(0.5 * (5 + 1) / 2)


def test_ascent_steps_project_and_stop():
    """One linear layer, SGD (lr, no momentum) on -CE: each step is w + lr grad CE,
    projected onto ||w - w_ref|| <= delta; no epoch: nothing moves; a threshold above
    every batch's accuracy: stops before the first step, one epoch started."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    model = torch.nn.Linear(3, 2)
    ref = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def batches(epoch):
        yield x[:3], y[:3]
        yield x[3:], y[3:]
    delta = 0.05
    run = pga.ascend(model, batches, ref, delta, lr=0.5, momentum=0.0, epochs=1, stop=-1.0,
                     seed=0, keys=(1,))
    assert run == {"epochs": 1, "steps": 2, "samples": 6}
    w = {k: v.clone().requires_grad_(True) for k, v in ref.items()}
    for xb, yb in ((x[:3], y[:3]), (x[3:], y[3:])):
        ce = torch.nn.functional.cross_entropy(xb @ w["weight"].T + w["bias"], yb)
        g = torch.autograd.grad(ce, [w["weight"], w["bias"]])
        with torch.no_grad():
            new = {"weight": w["weight"] + 0.5 * g[0], "bias": w["bias"] + 0.5 * g[1]}
            norm = math.sqrt(sum(float((new[k] - ref[k]).pow(2).sum()) for k in new))
            scale = min(1.0, delta / norm)
            w = {k: (ref[k] + (new[k] - ref[k]) * scale).requires_grad_(True) for k in new}
    for k in w:
        assert torch.allclose(model.state_dict()[k], w[k].detach(), atol=1e-6)

    model.load_state_dict(ref)
    assert pga.ascend(model, batches, ref, delta, lr=0.5, momentum=0.0, epochs=0, stop=-1.0,
                      seed=0, keys=()) == {"epochs": 0, "steps": 0, "samples": 0}
    assert pga.ascend(model, batches, ref, delta, lr=0.5, momentum=0.0, epochs=3, stop=1.1,
                      seed=0, keys=()) == {"epochs": 1, "steps": 0, "samples": 0}
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)
