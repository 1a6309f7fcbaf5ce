"""The clone / adapt / call protocol: isolation, first order, frozen and unused parameters."""

import gc
import resource

import numpy as np
import paddle
import pytest
from paddle import nn

from paddlefsl.metaopt import ANIL, MAML
from paddlefsl.models import Conv4


def _snapshot(layer):
    return {name: p.numpy().copy() for name, p in layer.named_parameters()}


def _assert_same(before, layer):
    for name, p in layer.named_parameters():
        assert np.array_equal(before[name], p.numpy()), f"{name} changed"


def _task(n=10):
    return paddle.randn([n, 1, 16, 16]), paddle.to_tensor(np.arange(n) % 5)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("running_stats", ["isolated"])
def test_adapt_leaves_model_bitwise_unchanged(first_order, running_stats):
    model = Conv4(1, 5, hidden=4, image_size=16)
    before = _snapshot(model)  # includes BatchNorm running statistics
    maml = MAML(model, lr=0.5, first_order=first_order, running_stats=running_stats)
    x, y = _task()
    learner = maml.clone()
    for _ in range(3):
        learner.adapt(nn.functional.cross_entropy(learner(x), y))
    loss = nn.functional.cross_entropy(learner(x), y)
    loss.backward()
    _assert_same(before, model)
    # The clone did move: its fast weights differ from the model's.
    fast = learner.fast_weights()
    assert not np.allclose(fast["head.weight"].numpy(), model.head.weight.numpy())
    # Its own BatchNorm statistics moved, the model's did not.
    assert not np.allclose(
        learner._stats["features.0.1._mean"].numpy(), model.features[0][1]._mean.numpy()
    )


def test_shared_running_stats_update_the_model():
    model = Conv4(1, 5, hidden=4, image_size=16)
    mean_before = model.features[0][1]._mean.numpy().copy()
    learner = MAML(model, lr=0.5, running_stats="shared").clone()
    x, _ = _task()
    learner(x)
    assert not np.allclose(mean_before, model.features[0][1]._mean.numpy())


def test_fomaml_gradient_is_query_gradient_at_adapted_weights():
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    maml = MAML(model, lr=0.3, first_order=True)
    xs, xq = paddle.randn([6, 3]), paddle.randn([6, 3])
    ys, yq = paddle.randn([6, 2]), paddle.randn([6, 2])
    learner = maml.clone()
    for _ in range(2):
        learner.adapt(nn.functional.mse_loss(learner(xs), ys))
    nn.functional.mse_loss(learner(xq), yq).backward()
    # Reference: an independent copy of the model set to the adapted weights.
    reference = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    fast = learner.fast_weights()
    for name, p in reference.named_parameters():
        p.set_value(fast[name].numpy())
    nn.functional.mse_loss(reference(xq), yq).backward()
    for (name, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        np.testing.assert_allclose(
            p.grad.numpy(), r.grad.numpy(), rtol=1e-5, atol=1e-7, err_msg=name
        )


def test_sgd_step_matches_manual_update():
    model = nn.Linear(3, 2)
    maml = MAML(model, lr=0.25)
    x, y = paddle.randn([4, 3]), paddle.randn([4, 2])
    learner = maml.clone()
    learner.adapt(nn.functional.mse_loss(learner(x), y))
    w = model.weight
    (g,) = paddle.grad(nn.functional.mse_loss(model(x), y), [w])
    np.testing.assert_allclose(
        learner.fast_weights()["weight"].numpy(), (w - 0.25 * g).numpy(), rtol=1e-6
    )


def test_sgd_step_on_prescaled_gradients_matches_manual_update_in_float64():
    # adapt() seeds its backward with lr instead of scaling every gradient afterwards.
    paddle.set_default_dtype("float64")
    try:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        maml = MAML(model, lr=0.3)
        x, y = paddle.randn([5, 3]), paddle.randn([5, 2])
        learner = maml.clone()
        learner.adapt(nn.functional.mse_loss(learner(x), y))
        names = [n for n, _ in model.named_parameters()]
        params = [p for _, p in model.named_parameters()]
        grads = paddle.grad(nn.functional.mse_loss(model(x), y), params)
        fast = learner.fast_weights()
        for name, p, g in zip(names, params, grads):
            np.testing.assert_allclose(
                fast[name].numpy(), (p - 0.3 * g).numpy(), rtol=1e-13, atol=1e-15
            )
    finally:
        paddle.set_default_dtype("float32")


def test_a_custom_update_gets_the_plain_gradients():
    seen = []

    class HalfStep(MAML):
        def update(self, params, grads):
            seen.append(grads)
            return {n: p - 0.5 * self.lr * grads[n] for n, p in params.items()}

    model = nn.Linear(3, 2)
    x, y = paddle.randn([4, 3]), paddle.randn([4, 2])
    learner = HalfStep(model, lr=0.25).clone()
    learner.adapt(nn.functional.mse_loss(learner(x), y))
    (g,) = paddle.grad(nn.functional.mse_loss(model(x), y), [model.weight])
    np.testing.assert_allclose(seen[0]["weight"].numpy(), g.numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        learner.fast_weights()["weight"].numpy(),
        (model.weight - 0.125 * g).numpy(),
        rtol=1e-6,
    )


def test_frozen_parameters_are_not_adapted_and_get_no_gradient():
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    model[0].weight.stop_gradient = True
    frozen = model[0].weight.numpy().copy()
    maml = MAML(model, lr=0.3)
    learner = maml.clone()
    assert "0.weight" not in learner.fast_weights()
    x, y = paddle.randn([5, 3]), paddle.randn([5, 2])
    learner.adapt(nn.functional.mse_loss(learner(x), y))
    nn.functional.mse_loss(learner(x), y).backward()
    assert model[0].weight.grad is None
    assert np.array_equal(model[0].weight.numpy(), frozen)
    assert model[2].weight.grad is not None


@pytest.mark.parametrize("first_order", [False, True])
def test_inner_frozen_parameters_keep_their_value_and_get_meta_gradient(first_order):
    model = Conv4(1, 3, hidden=4, pooling="stride", image_size=16, norm_scale=False)
    offsets = model.batch_norm_offsets()
    assert offsets == [f"features.{i}.1.bias" for i in range(4)]
    for name, p in model.named_parameters():  # non-zero offsets, so a step would show
        if name in offsets:
            p.set_value(paddle.randn(p.shape))
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    maml = MAML(model, lr=0.5, first_order=first_order, inner_frozen=offsets)
    learner = maml.clone()
    x, y = paddle.randn([6, 1, 16, 16]), paddle.to_tensor(np.arange(6) % 3)
    learner.adapt(nn.functional.cross_entropy(learner(x), y))
    learner.adapt(nn.functional.cross_entropy(learner(x), y))
    fast = learner.fast_weights()
    params = dict(model.named_parameters())
    for name in offsets:
        assert np.array_equal(fast[name].numpy(), params[name].numpy())
    assert not np.array_equal(fast["features.0.0.weight"].numpy(), before["features.0.0.weight"])
    nn.functional.cross_entropy(learner(x), y).backward()
    for name, p in model.named_parameters():
        assert np.array_equal(p.numpy(), before[name])  # the model itself is untouched
        if name in offsets:  # the outer loop trains the offsets
            assert p.grad is not None and float(p.grad.abs().sum()) > 0
    assert "inner_frozen" in repr(maml)


def test_inner_frozen_names_are_checked():
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"'2\.bogus'.*named_parameters"):
        MAML(model, lr=0.1, inner_frozen=["2.bogus"])
    with pytest.raises(TypeError, match=r"inner_frozen=\['0.bias'\]"):
        MAML(model, lr=0.1, inner_frozen="0.bias")
    model[0].bias.stop_gradient = True
    with pytest.raises(ValueError, match="not trainable"):
        MAML(model, lr=0.1, inner_frozen=["0.bias"])


class TwoHeads(nn.Layer):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.used = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 2)

    def forward(self, x):
        return self.used(paddle.tanh(self.body(x)))


def test_unused_parameters_stay_unchanged_or_raise():
    model = TwoHeads()
    x, y = paddle.randn([5, 3]), paddle.randn([5, 2])
    learner = MAML(model, lr=0.3).clone()
    learner.adapt(nn.functional.mse_loss(learner(x), y))
    assert learner.fast_weights()["unused.weight"] is model.unused.weight
    strict = MAML(model, lr=0.3, allow_unused=False).clone()
    with pytest.raises(ValueError, match="unused.weight.*allow_unused=True"):
        strict.adapt(nn.functional.mse_loss(strict(x), y))
    strict = MAML(model, lr=0.3).clone(allow_unused=False)
    with pytest.raises(ValueError, match="unused.weight"):
        strict.adapt(nn.functional.mse_loss(strict(x), y))


def test_anil_adapts_only_the_head_and_features_get_meta_gradient():
    model = Conv4(1, 5, hidden=4, image_size=16)
    anil = ANIL(model.features, model.head, lr=0.5)
    x, y = _task()
    learner = anil.clone()
    assert sorted(learner.fast_weights()) == ["head.bias", "head.weight"]
    learner.adapt(nn.functional.cross_entropy(learner(x), y))
    nn.functional.cross_entropy(learner(x), y).backward()
    assert model.features[0][0].weight.grad is not None
    assert float(model.features[0][0].weight.grad.abs().sum()) > 0
    assert {id(p) for p in anil.parameters()} == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("first_order", [False, True])
def test_anil_features_computed_once_give_the_same_meta_gradient(first_order):
    """embed() once + head_forward() per step equals calling the clone at every step."""
    paddle.set_default_dtype("float64")
    try:
        paddle.seed(2)
        model = Conv4(1, 5, hidden=4, image_size=16)
        anil = ANIL(model.features, model.head, lr=0.5, first_order=first_order)
        params = [p for p in anil.parameters() if not p.stop_gradient]
        (xs, ys), (xq, yq) = _task(), _task(15)
        results = []
        for once in (False, True):
            learner = anil.clone()
            support = learner.embed(xs) if once else None
            for _ in range(3):
                logits = learner.head_forward(support) if once else learner(xs)
                learner.adapt(nn.functional.cross_entropy(logits, ys))
            query = learner.head_forward(learner.embed(xq)) if once else learner(xq)
            loss = nn.functional.cross_entropy(query, yq)
            results.append([g.numpy() for g in paddle.grad(loss, params)])
        for a, b in zip(*results):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        # embed() on a clone keeps the clone's statistics (isolated): the model's stay.
        before = _snapshot(model)
        anil.clone().embed(xq)
        _assert_same(before, model)
        # On the meta-learner, the two halves are the plain features and head.
        x = paddle.randn([3, 1, 16, 16])
        np.testing.assert_allclose(
            anil.head_forward(anil.embed(x)).numpy(), model.head(model.features(x)).numpy()
        )
    finally:
        paddle.set_default_dtype("float32")


def test_errors_are_clear():
    maml = MAML(nn.Linear(2, 1), lr=0.1)
    with pytest.raises(RuntimeError, match="clone"):
        maml.adapt(maml(paddle.randn([3, 2])).sum())
    learner = maml.clone()
    with pytest.raises(ValueError, match="scalar"):
        learner.adapt(learner(paddle.randn([3, 2])))
    with pytest.raises(TypeError, match="paddle.nn.Layer"):
        MAML(lambda x: x, lr=0.1)
    with pytest.raises(ValueError, match="running_stats"):
        MAML(nn.Linear(2, 1), lr=0.1, running_stats="bogus")
    fo = MAML(nn.Linear(2, 1), lr=0.1, first_order=True).clone()
    with pytest.raises(ValueError, match="first_order=False"):
        fo.adapt(fo(paddle.randn([3, 2])).sum(), first_order=False)


def test_per_call_first_order_override_matches_fomaml():
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = paddle.randn([5, 3]), paddle.randn([5, 2])
    grads = []
    for maml, first_order in (
        (MAML(model, lr=0.3), True),
        (MAML(model, lr=0.3, first_order=True), None),
    ):
        learner = maml.clone()
        learner.adapt(nn.functional.mse_loss(learner(x), y), first_order=first_order)
        (g,) = paddle.grad(nn.functional.mse_loss(learner(x), y), [model[0].weight])
        grads.append(g.numpy())
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6)


def test_clone_of_clone_continues_from_fast_weights():
    maml = MAML(nn.Linear(2, 1), lr=0.1)
    x, y = paddle.randn([3, 2]), paddle.randn([3, 1])
    a = maml.clone()
    a.adapt(nn.functional.mse_loss(a(x), y))
    b = a.clone()
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())
    b.adapt(nn.functional.mse_loss(b(x), y))
    assert not np.allclose(a(x).numpy(), b(x).numpy())


def test_substitution_is_restored_after_an_error():
    class Boom(nn.Layer):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)

        def forward(self, x):
            self.linear(x)
            raise RuntimeError("boom")

    model = Boom()
    weight = model.linear.weight
    learner = MAML(model, lr=0.1).clone()
    with pytest.raises(RuntimeError, match="boom"):
        learner(paddle.randn([1, 2]))
    assert model.linear.weight is weight
    assert isinstance(model.linear.weight, paddle.base.framework.EagerParamBase)


def _rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def test_no_graph_leak_over_many_iterations():
    model = Conv4(1, 5, hidden=8, image_size=16)
    maml = MAML(model, lr=0.4)
    opt = paddle.optimizer.Adam(1e-3, parameters=maml.parameters())
    x, y = _task()

    def iteration():
        learner = maml.clone()
        learner.adapt(nn.functional.cross_entropy(learner(x), y))
        nn.functional.cross_entropy(learner(x), y).backward()
        opt.step()
        opt.clear_grad()

    for _ in range(50):
        iteration()
    gc.collect()
    start = _rss_mib()
    for _ in range(250):
        iteration()
    gc.collect()
    growth = _rss_mib() - start
    assert growth < 25, f"RSS grew by {growth:.1f} MiB over 250 meta-iterations"


class _Recurrent(nn.Layer):
    """A sequence classifier on a fused recurrent layer (GRU, LSTM or SimpleRNN)."""

    def __init__(self, cell, **kwargs):
        super().__init__()
        self.rnn = cell(3, 6, **kwargs)
        directions = 2 if kwargs.get("direction") == "bidirect" else 1
        self.head = nn.Linear(6 * directions, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out.mean(1))


RECURRENT = {
    "gru": (nn.GRU, {}),
    "lstm": (nn.LSTM, {}),
    "simple_rnn": (nn.SimpleRNN, {}),
    "lstm_2_layers_bidirect": (nn.LSTM, {"num_layers": 2, "direction": "bidirect"}),
}


@pytest.mark.parametrize("kind", sorted(RECURRENT))
def test_recurrent_layers_adapt_first_order(kind):
    """Fused RNNs keep an uninitialised dropout-state buffer and read their weights from a
    private list: cloning must not fail on the one, adapting must reach the other."""
    cell, kwargs = RECURRENT[kind]
    paddle.seed(0)
    model = _Recurrent(cell, **kwargs)
    before = _snapshot(model)
    maml = MAML(model, lr=0.5, first_order=True)
    xs, xq = paddle.randn([4, 5, 3]), paddle.randn([4, 5, 3])
    ys, yq = paddle.to_tensor([0, 1, 0, 1]), paddle.to_tensor([1, 0, 1, 0])
    learner = maml.clone()
    for _ in range(2):
        learner.adapt(nn.functional.cross_entropy(learner(xs), ys))
    nn.functional.cross_entropy(learner(xq), yq).backward()
    _assert_same(before, model)
    # The meta-gradient is the query gradient of an independent copy at the fast weights,
    # so the fused kernel really ran with them (the recurrent weights included).
    paddle.seed(0)
    reference = _Recurrent(cell, **kwargs)
    fast = learner.fast_weights()
    for name, p in reference.named_parameters():
        p.set_value(fast[name].numpy())
    nn.functional.cross_entropy(reference(xq), yq).backward()
    changed = 0
    for (name, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        np.testing.assert_allclose(
            p.grad.numpy(), r.grad.numpy(), rtol=1e-5, atol=1e-7, err_msg=name
        )
        changed += not np.array_equal(before[name], fast[name].numpy())
    assert changed == len(before)  # every weight was adapted, the recurrent ones too
