"""Convolution from three mutually-differentiating kernels (paddlefsl.ops.conv_graph).

The algebra is checked on Paddle's own kernels in float64, against native conv2d (first
and second order), against finite differences (third order, where native conv2d is wrong),
and routed through the conv2d replacement inside MAML (finite-difference meta-gradient).
"""

import numpy as np
import paddle
import pytest
from paddle import nn

from paddlefsl.metaopt import ANIL, MAML, check_second_order
from paddlefsl.models import Conv4
from paddlefsl.ops import conv as conv_ops
from paddlefsl.ops import conv_graph
from paddlefsl.ops.conv_graph import NATIVE_KERNELS, ConvGeometry, conv2d, conv2d_bias

CASES = [  # batch, in channels, size, out channels, stride, padding
    (2, 3, 7, 4, 2, 1),
    (3, 2, 6, 5, 1, 0),
    (1, 4, 5, 2, 2, 0),
    (2, 2, 8, 3, 1, 1),
]


def _towers(case, via_graph, seed=1):
    """y, first-, second- and third-order gradients of a fixed scalar tower (float64)."""
    n, c, size, o, s, p = case
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal((n, c, size, size)), stop_gradient=False)
    w = paddle.to_tensor(rng.standard_normal((o, c, 3, 3)), stop_gradient=False)
    draw = np.random.default_rng(seed)
    if via_graph:
        y = conv2d(x, w, ConvGeometry((s, s), (p, p), (size, size), (3, 3)), NATIVE_KERNELS)
    else:
        y = nn.functional.conv2d(x, w, stride=s, padding=p)
    loss = (y * y * paddle.to_tensor(draw.standard_normal(y.shape))).sum()
    gx, gw = paddle.grad(loss, [x, w], create_graph=True)
    a = paddle.to_tensor(draw.standard_normal(gx.shape))
    b = paddle.to_tensor(draw.standard_normal(gw.shape))
    second = (gx * gx * a).sum() + (gw * gw * b).sum()
    hx, hw = paddle.grad(second, [x, w], create_graph=True)
    third = _contract(hx, hw, draw)
    tx, tw = paddle.grad(third, [x, w])
    return [t.numpy() for t in (y, gx, gw, hx, hw)], (tx.numpy(), tw.numpy()), float(third)


def _contract(hx, hw, draw):
    """A fixed linear functional of the second-order gradients (smooth for differences)."""
    c = paddle.to_tensor(draw.standard_normal(hx.shape))
    d = paddle.to_tensor(draw.standard_normal(hw.shape))
    return (hx * c).sum() + (hw * d).sum()


@pytest.fixture(autouse=True)
def _float64():
    paddle.set_default_dtype("float64")
    yield
    paddle.set_default_dtype("float32")


@pytest.mark.parametrize("case", CASES)
def test_first_and_second_order_equal_native(case):
    ours, _, _ = _towers(case, via_graph=True)
    ref, _, _ = _towers(case, via_graph=False)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())


@pytest.mark.parametrize("case", CASES[:2])
def test_third_order_matches_finite_differences(case):
    n, c, size, o, s, p = case
    _, (tx, tw), _ = _towers(case, via_graph=True)
    rng = np.random.default_rng(7)
    dx, dw = rng.standard_normal(tx.shape), rng.standard_normal(tw.shape)
    analytic = (tx * dx).sum() + (tw * dw).sum()

    def third_at(step):
        start = np.random.default_rng(0)
        x0 = start.standard_normal((n, c, size, size))
        w0 = start.standard_normal((o, c, 3, 3))
        x = paddle.to_tensor(x0 + step * dx, stop_gradient=False)
        w = paddle.to_tensor(w0 + step * dw, stop_gradient=False)
        draw = np.random.default_rng(1)
        y = conv2d(x, w, ConvGeometry((s, s), (p, p), (size, size), (3, 3)), NATIVE_KERNELS)
        loss = (y * y * paddle.to_tensor(draw.standard_normal(y.shape))).sum()
        gx, gw = paddle.grad(loss, [x, w], create_graph=True)
        a = paddle.to_tensor(draw.standard_normal(gx.shape))
        b = paddle.to_tensor(draw.standard_normal(gw.shape))
        hx, hw = paddle.grad((gx * gx * a).sum() + (gw * gw * b).sum(), [x, w])
        return float(_contract(hx, hw, draw))

    eps = 1e-5
    numeric = (third_at(eps) - third_at(-eps)) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-6)


def _bias_tower(case, via_graph, start, need=(True, True), seed=2):
    """Output and first/second-order gradients of a biased conv (float64), flattened."""
    n, c, size, o, s, p = case
    # Native conv2d drops the filter-to-filter second derivative when x needs no gradient,
    # so the reference always tracks x (and only differentiates what is wanted).
    x = paddle.to_tensor(start[0], stop_gradient=via_graph and not need[0])
    w = paddle.to_tensor(start[1], stop_gradient=not need[1])
    b = paddle.to_tensor(start[2], stop_gradient=not need[1])
    if via_graph:
        geo = ConvGeometry((s, s), (p, p), (size, size), (3, 3))
        y = conv2d_bias(x, w, b, geo, NATIVE_KERNELS)
    else:
        y = nn.functional.conv2d(x, w, b, stride=s, padding=p)
    wanted = [t for t, needed in zip((x, w, b), (need[0], need[1], need[1])) if needed]
    if not wanted:
        return [y.numpy()], None
    inputs = wanted if via_graph or need[0] else [x, *wanted]
    keep = slice(len(inputs) - len(wanted), None)
    draw = np.random.default_rng(seed)
    loss = (y * y * paddle.to_tensor(draw.standard_normal(y.shape))).sum()
    first = paddle.grad(loss, inputs, create_graph=True)[keep]
    second_loss = sum(
        (g * g * paddle.to_tensor(draw.standard_normal(g.shape))).sum() for g in first
    )
    second = paddle.grad(second_loss, inputs, create_graph=True)[keep]
    contraction = sum((h * paddle.to_tensor(draw.standard_normal(h.shape))).sum() for h in second)
    return [t.numpy() for t in (y, *first, *second)], (wanted, contraction)


def _bias_start(case, seed=0):
    n, c, size, o, _, _ = case
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, c, size, size)),
        rng.standard_normal((o, c, 3, 3)),
        rng.standard_normal(o),
    )


@pytest.mark.parametrize("need", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("case", CASES[:2])
def test_biased_convolution_equals_native_conv_plus_bias(case, need):
    """Folded bias: value, first and second order as Paddle's conv2d with a bias."""
    start = _bias_start(case)
    ours, _ = _bias_tower(case, True, start, need)
    ref, _ = _bias_tower(case, False, start, need)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())


def test_biased_convolution_third_order_matches_finite_differences():
    case = CASES[0]
    start = _bias_start(case)
    _, (wanted, contraction) = _bias_tower(case, True, start)
    third = paddle.grad(contraction, wanted)
    rng = np.random.default_rng(9)
    directions = [rng.standard_normal(t.shape) for t in start]
    analytic = sum(float((g.numpy() * d).sum()) for g, d in zip(third, directions))

    def contraction_at(step):
        moved = [a + step * d for a, d in zip(start, directions)]
        return float(_bias_tower(case, True, moved)[1][1])

    eps = 1e-5
    numeric = (contraction_at(eps) - contraction_at(-eps)) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-6)


def test_biased_convolution_declines_a_frozen_bias_or_filter():
    """Only one of filter and bias trainable: the caller adds the bias itself."""
    geo = ConvGeometry((1, 1), (1, 1), (6, 6), (3, 3))
    x, w, b = paddle.randn([2, 3, 6, 6]), paddle.randn([4, 3, 3, 3]), paddle.randn([4])
    w.stop_gradient = False
    assert conv2d_bias(x, w, b, geo, NATIVE_KERNELS) is None
    w.stop_gradient, b.stop_gradient = True, False
    assert conv2d_bias(x, w, b, geo, NATIVE_KERNELS) is None


def test_gradients_only_for_inputs_that_need_them():
    x = paddle.randn([2, 3, 6, 6])  # data: no gradient
    w = paddle.randn([4, 3, 3, 3])
    w.stop_gradient = False
    y = conv2d(x, w, ConvGeometry((1, 1), (1, 1), (6, 6), (3, 3)), NATIVE_KERNELS)
    (gw,) = paddle.grad(y.square().sum(), [w], create_graph=True)
    # The filter-to-filter term native conv2d drops when x needs no gradient is kept here.
    (hw,) = paddle.grad(gw.square().sum(), [w])
    assert float(hw.abs().sum()) > 0
    assert x.grad is None


@pytest.mark.parametrize("channels", [1, 3], ids=["grey", "rgb"])
def test_conv4_meta_gradient_through_the_fast_path(monkeypatch, channels):
    """MAML on Conv4 with every conv, the first included, routed through conv_graph."""
    monkeypatch.setattr(conv_ops, "FAST_DTYPES", (paddle.float32, paddle.float64))
    monkeypatch.setattr(conv_ops, "_FAST", [NATIVE_KERNELS])
    calls = []
    whole = conv_graph._Whole.apply
    monkeypatch.setattr(conv_graph._Whole, "apply", lambda *a: calls.append("whole") or whole(*a))
    for name in ("_graph_conv2d", "_graph_conv2d_bias"):
        real = getattr(conv_ops, name)

        def spy(*a, _r=real, _n=name):
            calls.append((_n, a[0].shape[1]))
            return _r(*a)

        monkeypatch.setattr(conv_ops, name, spy, raising=True)
    paddle.seed(0)
    model = Conv4(channels, 3, hidden=4, pooling="stride", image_size=16)
    x, xq = paddle.randn([6, channels, 16, 16]), paddle.randn([6, channels, 16, 16])
    y = paddle.to_tensor(np.arange(6) % 3)
    report = check_second_order(
        MAML(model, lr=0.5), nn.CrossEntropyLoss(), (x, y), (xq, y), steps=2, rtol=1e-5
    )
    # Conv4's convolutions have biases: they take the fused-bias graph, the first layer
    # (1 or 3 input channels) included.
    assert ("_graph_conv2d_bias", channels) in calls, "the first layer took Paddle's kernel"
    assert ("_graph_conv2d_bias", 4) in calls, "the hidden layers took Paddle's kernel"
    assert "whole" in calls, "the hidden convolutions were not recorded as whole nodes"
    assert report.ok, str(report)
    assert abs(report.first_order - report.numeric) > 1e-3 * abs(report.numeric), str(report)


@pytest.mark.parametrize(
    "change, fast",
    [
        ({}, True),
        ({"dtype": "float64"}, False),  # oneDNN has no float64 convolution
        ({"channels": 3}, True),  # RGB first layers too (sgemm forwards, session 17)
        ({"channels": 1}, True),  # one-channel first layers gain from the filter gradient
        ({"fmt": "NHWC"}, False),
        ({"groups": 2}, False),
        ({"dilations": [2, 2]}, False),
        ({"paddings": [1, 0, 1, 1]}, True),  # asymmetric: [top, bottom, left, right]
        ({"paddings": [1, 1, 2, 2]}, True),  # symmetric, 4-value form
        ({"paddings": [1, 1, 1]}, False),
        ({"paddings": [1, -1, 1, 1]}, False),  # Paddle's error, not the kernels'
        ({"algorithm": "SAME"}, False),
    ],
)
def test_which_convolutions_take_the_fast_kernels(change, fast):
    args = dict(dtype="float32", channels=16, fmt="NCHW", groups=1, dilations=[1, 1])
    args.update(paddings=[1, 1], algorithm="EXPLICIT")
    args.update(change)
    x = paddle.randn([2, args["channels"], 8, 8]).astype(args["dtype"])
    w = paddle.randn([4, args["channels"], 3, 3]).astype(args["dtype"])
    geo = conv_ops._fast_geometry(
        x,
        w,
        [1, 1],
        args["paddings"],
        args["algorithm"],
        args["dilations"],
        args["groups"],
        args["fmt"],
    )
    assert (geo is not None) == fast
    if fast:
        pads = args["paddings"]
        symmetric = pads[0] == pads[1] and pads[-2] == pads[-1]
        assert geo.paddings == ((pads[0], pads[-1]) if symmetric else tuple(pads))
        assert geo.input_hw == (8, 8) and geo.kernel_hw == (3, 3)


def test_fast_geometry_is_kept_per_size_and_setting():
    w = paddle.randn([4, 16, 3, 3], dtype="float32")
    seen = set()
    for size, stride, padding in [(8, 1, 1), (6, 1, 1), (8, 2, 1), (8, 1, 0), (8, 1, 1)]:
        x = paddle.randn([2, 16, size, size], dtype="float32")
        geo = conv_ops._fast_geometry(
            x, w, [stride, stride], [padding, padding], "EXPLICIT", [1, 1], 1, "NCHW"
        )
        assert geo.input_hw == (size, size)
        assert geo.strides == (stride, stride) and geo.paddings == (padding, padding)
        seen.add(geo)
    assert len(seen) == 4
    # Not sequences (a static-graph caller's forms): left to Paddle, not an error.
    x = paddle.randn([2, 16, 8, 8], dtype="float32")
    assert conv_ops._fast_geometry(x, w, 1, 1, "EXPLICIT", 1, 1, "NCHW") is None


def test_gradient_of_one_input_only():
    """A paddle.grad asking for the filter alone (Paddle prunes the input's branch)."""
    rng = np.random.default_rng(3)
    x0, w0 = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3))
    result = {}
    for via_graph in (True, False):
        x = paddle.to_tensor(x0, stop_gradient=False)
        w = paddle.to_tensor(w0, stop_gradient=False)
        if via_graph:
            y = conv2d(x, w, ConvGeometry((1, 1), (1, 1), (6, 6), (3, 3)), NATIVE_KERNELS)
        else:
            y = nn.functional.conv2d(x, w, padding=1)
        gx, gw = paddle.grad(y.square().sum(), [x, w], create_graph=True)
        (hw,) = paddle.grad(gw.square().sum() + gx.square().sum(), [w])
        (only_w,) = paddle.grad(y.sum(), [w])
        result[via_graph] = (hw.numpy(), only_w.numpy())
    for ours, ref in zip(result[True], result[False]):
        np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)


def test_anil_with_a_convolutional_head_through_the_fast_path(monkeypatch):
    """ANIL's inner step differentiates the head only; the features reach its conv."""
    monkeypatch.setattr(conv_ops, "FAST_DTYPES", (paddle.float32, paddle.float64))
    monkeypatch.setattr(conv_ops, "_FAST", [NATIVE_KERNELS])
    paddle.seed(0)
    features = nn.Sequential(nn.Conv2D(2, 4, 3, padding=1), nn.BatchNorm2D(4), nn.ReLU())
    head = nn.Sequential(nn.Conv2D(4, 3, 3), nn.AdaptiveAvgPool2D(1), nn.Flatten())
    x, xq = paddle.randn([6, 2, 6, 6]), paddle.randn([6, 2, 6, 6])
    y = paddle.to_tensor(np.arange(6) % 3)
    report = check_second_order(
        ANIL(features, head, lr=0.5), nn.CrossEntropyLoss(), (x, y), (xq, y), steps=2
    )
    assert report.ok, str(report)
    assert abs(report.first_order - report.numeric) > 1e-3 * abs(report.numeric), str(report)


def test_conv2d_layers_fold_their_bias_and_uninstall_restores(monkeypatch):
    """float32 Conv2D layers on the oneDNN kernels take the folded bias; a frozen bias
    falls back to the separate add; uninstall() puts Paddle's _conv_nd back."""
    from paddlefsl import ops
    from paddlefsl.ops import onednn

    if not onednn.available():
        pytest.skip(f"oneDNN ops unavailable: {onednn.unavailable_reason()}")
    paddle.set_default_dtype("float32")
    ops.uninstall()
    native_conv_nd = paddle.nn.functional.conv._conv_nd
    ops.install()
    calls = []
    real = conv_ops._graph_conv2d_bias

    def spy(*args):
        out = real(*args)
        if out is not None:  # None: declined (a frozen bias)
            calls.append(1)
        return out

    monkeypatch.setattr(conv_ops, "_graph_conv2d_bias", spy)
    paddle.seed(4)
    conv = nn.Conv2D(16, 8, 3, stride=2, padding=1)
    x = paddle.randn([3, 16, 9, 9])
    x.stop_gradient = False
    for frozen in (False, True):
        conv.bias.stop_gradient = frozen
        calls.clear()
        y = conv(x)
        (gx,) = paddle.grad(y.square().sum(), [x])
        assert bool(calls) == (not frozen)
        ops.uninstall()
        assert paddle.nn.functional.conv._conv_nd is native_conv_nd
        y_ref = conv(x)
        (gx_ref,) = paddle.grad(y_ref.square().sum(), [x])
        ops.install()
        np.testing.assert_allclose(y.numpy(), y_ref.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(gx.numpy(), gx_ref.numpy(), rtol=1e-4, atol=1e-3)
    assert paddle.nn.functional.conv._conv_nd is not native_conv_nd


def _whole_tower(case, bias, whole, everything=False):
    """Value and first/second-order gradients of a conv, in or out of the whole scope.

    ``everything``: the backward passes too run in the scope (as a second-order adapt
    records its backward), so the recorded D and W kernels are whole nodes as well.
    """
    from contextlib import nullcontext

    from paddlefsl import ops

    n, c, size, o, s, p = case
    start = _bias_start(case)
    x = paddle.to_tensor(start[0], stop_gradient=False)
    w = paddle.to_tensor(start[1], stop_gradient=False)
    b = paddle.to_tensor(start[2], stop_gradient=False)
    geo = ConvGeometry((s, s), (p, p), (size, size), (3, 3))
    with ops.whole_gradient_scope(whole):
        y = conv2d_bias(x, w, b, geo, NATIVE_KERNELS) if bias else conv2d(x, w, geo, NATIVE_KERNELS)
    inputs = [x, w, b] if bias else [x, w]
    draw = np.random.default_rng(4)
    with ops.whole_gradient_scope() if everything else nullcontext():
        loss = (y * y * paddle.to_tensor(draw.standard_normal(y.shape))).sum()
        first = paddle.grad(loss, inputs, create_graph=True)
        second_loss = sum(
            (g * g * paddle.to_tensor(draw.standard_normal(g.shape))).sum() for g in first
        )
    second = paddle.grad(second_loss, inputs)
    return y.grad_fn.name(), [t.numpy() for t in (y, *first, *second)]


@pytest.mark.parametrize("everything", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES[:3])
def test_whole_node_equals_one_node_per_input(case, bias, everything, monkeypatch):
    """Inside whole_gradient_scope a convolution is one node of x, w (and b): same tower."""
    ops_seen = []
    whole = conv_graph._Whole.apply
    monkeypatch.setattr(conv_graph._Whole, "apply", lambda *a: ops_seen.append(a[3]) or whole(*a))
    node, ours = _whole_tower(case, bias, whole=True, everything=everything)
    assert sorted(set(ops_seen)) == (["D", "F", "W"] if everything else ["F"]), ops_seen
    split_node, ref = _whole_tower(case, bias, whole=False)
    assert "_Whole" in node and "_Whole" not in split_node, (node, split_node)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())


def test_whole_node_third_order_matches_finite_differences():
    from paddlefsl import ops

    with ops.whole_gradient_scope():
        test_biased_convolution_third_order_matches_finite_differences()
        test_third_order_matches_finite_differences(CASES[1])


class _ScopeProbe(nn.Layer):
    """Records whether each call runs inside the whole-gradient scope."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen
        self.scale = self.create_parameter([1], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x):
        from paddlefsl import ops

        self.seen.append(ops.in_whole_gradient_scope())
        return (x[0] if isinstance(x, list) else x) * self.scale


def test_learners_enter_the_whole_gradient_scope_only_where_it_holds():
    seen = []
    x = paddle.randn([4, 3])
    maml = MAML(nn.Sequential(_ScopeProbe(seen), nn.Linear(3, 2)), lr=0.1)
    learner = maml.clone()
    learner(x)  # adapts every parameter, input needs no gradient
    tracked = x.detach()
    tracked.stop_gradient = False
    learner(tracked)  # the input requires grad: an adapt would prune it
    learner([tracked])  # also inside a container
    frozen_probe = MAML(nn.Sequential(_ScopeProbe(seen), nn.Linear(3, 2)), lr=0.1)
    frozen_probe.module[1].weight.stop_gradient = True
    frozen_probe.clone()(x)  # a frozen weight is no obstacle
    assert seen == [True, False, False, True]

    seen.clear()
    anil = ANIL(_ScopeProbe(seen), nn.Sequential(_ScopeProbe(seen), nn.Linear(3, 2)), lr=0.1)
    learner = anil.clone()
    learner(x)  # features in (adapt prunes them whole), head out (its input is not adapted)
    learner.head_forward(learner.embed(x))
    assert seen == [True, False, True, False]


def test_narrowed_adaptation_stays_out_of_the_whole_gradient_scope():
    seen = []

    class HeadOnly(MAML):
        def adapted_names(self):
            return [n for n in super().adapted_names() if n.startswith("1.")]

    learner = HeadOnly(nn.Sequential(_ScopeProbe(seen), nn.Linear(3, 2)), lr=0.1).clone()
    learner(paddle.randn([4, 3]))
    assert seen == [False]


def _rgb_meta_gradient():
    paddle.set_default_dtype("float32")  # the fast kernels are float32 (the module's is 64)
    paddle.seed(0)
    model = Conv4(3, 5, hidden=8, pooling="max", image_size=21)
    rng = np.random.default_rng(1)
    xs = paddle.to_tensor(rng.standard_normal((5, 3, 21, 21)), "float32")
    xq = paddle.to_tensor(rng.standard_normal((15, 3, 21, 21)), "float32")
    ys, yq = paddle.to_tensor(np.arange(5)), paddle.to_tensor(np.arange(15) % 5)
    maml = MAML(model, lr=0.05)
    clone = maml.clone()
    for _ in range(2):
        clone.adapt(nn.functional.cross_entropy(clone(xs), ys))
    params = list(maml.parameters())
    grads = paddle.grad(nn.functional.cross_entropy(clone(xq), yq), params, allow_unused=True)
    return [None if g is None else g.numpy() for g in grads]


def test_rgb_conv4_meta_gradient_on_the_fast_kernels_equals_paddles(monkeypatch):
    """The real fast kernels (oneDNN, sgemm for the 3-channel first layer) in a whole
    second-order meta-gradient, against the same graph on Paddle's kernels."""
    fast = conv_ops.fast_kernels()
    if fast is None:
        pytest.skip("the oneDNN kernels are unavailable here")
    calls = []
    real = conv_ops._graph_conv2d_bias

    def spy(*a):
        calls.append(a[0].shape[1])
        return real(*a)

    monkeypatch.setattr(conv_ops, "_graph_conv2d_bias", spy)
    on_fast = _rgb_meta_gradient()
    assert 3 in calls, "the RGB first layer did not take the fast path"
    monkeypatch.setattr(conv_ops, "_FAST", [NATIVE_KERNELS])
    on_native = _rgb_meta_gradient()
    assert [g is None for g in on_fast] == [g is None for g in on_native]
    assert sum(g is not None for g in on_fast) >= 12
    # Conv biases before BatchNorm have a zero gradient up to rounding (about 1e-7 here),
    # hence the absolute floor; the others agree to about 1e-6 relative.
    atol = 1e-5 * max(np.abs(w).max() for w in on_native if w is not None)
    for got, want in zip(on_fast, on_native):
        if want is not None:
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max() + atol
