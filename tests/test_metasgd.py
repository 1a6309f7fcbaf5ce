"""Meta-SGD: learned per-weight learning rates, exact meta-gradients for weights and rates."""

import numpy as np
import paddle
import pytest
from paddle import nn

from paddlefsl.metaopt import MAML, MetaSGD, check_second_order
from paddlefsl.models import Conv4

RTOL = 1e-5


def _labels(n, ways=3):
    return paddle.to_tensor(np.arange(n) % ways)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("name", ["mlp", "conv4"])
def test_meta_gradient_of_weights_and_rates_matches_finite_differences(name, steps):
    if name == "mlp":
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
        x, xq = paddle.randn([9, 4]), paddle.randn([9, 4])
    else:
        model = Conv4(1, 3, hidden=4, pooling="max", image_size=16)
        x, xq = paddle.randn([6, 1, 16, 16]), paddle.randn([6, 1, 16, 16])
    metasgd = MetaSGD(model, lr=0.3)
    # the random direction moves the learning rates too: they are parameters of the learner
    assert len(metasgd.parameters()) > len(model.parameters())
    report = check_second_order(
        metasgd,
        nn.CrossEntropyLoss(),
        (x, _labels(x.shape[0])),
        (xq, _labels(xq.shape[0])),
        steps=steps,
        rtol=RTOL,
    )
    assert report.ok, str(report)
    assert abs(report.first_order - report.numeric) > 100 * RTOL * abs(report.numeric), report


@pytest.mark.parametrize("first_order", [False, True])
def test_one_step_closed_form(float64, first_order):
    """f(x) = w x, squared loss: w' = w - a g; dLq/da = -g q in both orders."""
    xs, ys = np.array([0.5, -1.0, 2.0]), np.array([1.0, 0.0, -1.0])
    xq, yq = np.array([1.5, -0.5]), np.array([0.5, 2.0])
    w, a = 0.7, 0.2
    model = nn.Linear(1, 1, bias_attr=False)
    model.weight.set_value(paddle.to_tensor([[w]]))
    metasgd = MetaSGD(model, lr=a, first_order=first_order)
    learner = metasgd.clone()
    mse = nn.functional.mse_loss
    learner.adapt(mse(learner(paddle.to_tensor(xs[:, None])), paddle.to_tensor(ys[:, None])))
    mse(learner(paddle.to_tensor(xq[:, None])), paddle.to_tensor(yq[:, None])).backward()

    g = 2 * np.mean(xs * (w * xs - ys))
    w_new = w - a * g
    q = 2 * np.mean(xq * (w_new * xq - yq))
    dw = q if first_order else q * (1 - a * 2 * np.mean(xs**2))
    np.testing.assert_allclose(learner.fast_weights()["weight"].numpy(), [[w_new]], rtol=1e-12)
    np.testing.assert_allclose(model.weight.grad.numpy(), [[dw]], rtol=1e-10)
    (rate,) = metasgd.lrs
    np.testing.assert_allclose(rate.grad.numpy(), [[-g * q]], rtol=1e-10)


def test_equal_rates_take_maml_steps():
    model = Conv4(1, 3, hidden=4, pooling="stride", image_size=16)
    x, y = paddle.randn([6, 1, 16, 16]), _labels(6)
    fast = {}
    for learner_type in (MAML, MetaSGD):
        clone = learner_type(model, lr=0.4).clone()
        for _ in range(2):
            clone.adapt(nn.functional.cross_entropy(clone(x), y))
        fast[learner_type] = clone.fast_weights()
    assert fast[MAML].keys() == fast[MetaSGD].keys()
    for name, value in fast[MAML].items():
        np.testing.assert_allclose(
            fast[MetaSGD][name].numpy(), value.numpy(), rtol=1e-5, atol=1e-6, err_msg=name
        )


def test_adapt_leaves_model_and_rates_bitwise_unchanged():
    model = Conv4(1, 3, hidden=4, image_size=16)
    metasgd = MetaSGD(model, lr=0.1)
    before = {n: p.numpy().copy() for n, p in metasgd.named_parameters()}
    x, y = paddle.randn([6, 1, 16, 16]), _labels(6)
    clone = metasgd.clone()
    for _ in range(2):
        clone.adapt(nn.functional.cross_entropy(clone(x), y))
    nn.functional.cross_entropy(clone(x), y).backward()
    for name, p in metasgd.named_parameters():
        assert np.array_equal(before[name], p.numpy()), f"{name} changed"
    assert all(r.grad is not None for r in metasgd.lrs)


def test_frozen_weights_get_no_rate_and_stay():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    metasgd = MetaSGD(model, lr=0.5, inner_frozen=["0.bias"])
    assert sorted(metasgd.learning_rates()) == ["0.weight", "2.bias", "2.weight"]
    clone = metasgd.clone()
    x = paddle.randn([5, 3])
    clone.adapt(nn.functional.cross_entropy(clone(x), _labels(5, 2)))
    fast = clone.fast_weights()
    assert np.array_equal(fast["0.bias"].numpy(), model[0].bias.numpy())
    assert not np.array_equal(fast["0.weight"].numpy(), model[0].weight.numpy())


def test_rates_are_saved_and_restored_with_the_learner():
    def build():
        paddle.seed(0)
        return MetaSGD(nn.Linear(3, 2), lr=0.1)

    trained = build()
    for rate in trained.lrs:
        rate.set_value(paddle.rand(rate.shape))
    state = trained.state_dict()
    assert {k for k in state if k.startswith("lrs.")} == {"lrs.0", "lrs.1"}
    restored = build()
    restored.set_state_dict(state)
    for a, b in zip(trained.lrs, restored.lrs):
        assert np.array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("lr", [0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_initial_rate_is_a_clear_error(lr):
    with pytest.raises(ValueError, match="MetaSGD: lr"):
        MetaSGD(nn.Linear(2, 2), lr=lr)
