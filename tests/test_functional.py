"""The functional core: substitution by name, restoration, tied and fused-RNN weights."""

import os

import numpy as np
import paddle
import pytest
from paddle import nn

from paddlefsl.functional import (
    adaptable_parameters,
    functional_call,
    named_grad,
    running_statistics,
    substituted,
)
from paddlefsl.functional.params import index_tensors


def test_functional_call_equals_manual_forward():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = paddle.randn([5, 3])
    new = {name: p * 2.0 for name, p in adaptable_parameters(net).items()}
    out = functional_call(net, new, x)
    manual = paddle.tanh(x @ new["0.weight"] + new["0.bias"]) @ new["2.weight"] + new["2.bias"]
    np.testing.assert_allclose(out.numpy(), manual.numpy(), rtol=1e-6)
    # And the module is back to its own parameters.
    np.testing.assert_allclose(net(x).numpy(), (net[2](paddle.tanh(net[0](x)))).numpy())
    assert isinstance(net[0].weight, paddle.base.framework.EagerParamBase)


def test_tied_weights_follow_the_substitute():
    class Tied(nn.Layer):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3, bias_attr=False)
            self.b = nn.Linear(3, 3, bias_attr=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    net = Tied()
    names = list(adaptable_parameters(net))
    assert names == ["a.weight"]
    w = paddle.eye(3) * 2.0
    x = paddle.ones([1, 3])
    np.testing.assert_allclose(functional_call(net, {"a.weight": w}, x).numpy(), [[4.0] * 3])


def test_fused_lstm_uses_substituted_weights():
    lstm = nn.LSTM(3, 4)
    x = paddle.randn([2, 5, 3])
    zeros = {name: paddle.zeros_like(p) for name, p in adaptable_parameters(lstm).items()}
    out, _ = functional_call(lstm, zeros, x)
    np.testing.assert_allclose(out.numpy(), 0.0, atol=1e-7)
    out, _ = lstm(x)
    assert np.abs(out.numpy()).max() > 1e-3


def test_index_matches_paddles_named_views_on_awkward_structures():
    """Shared sublayers, tied weights, a None parameter and buffers: same names, order."""

    class Awkward(nn.Layer):
        def __init__(self):
            super().__init__()
            shared = nn.Linear(3, 3)
            self.first = nn.Sequential(shared, nn.BatchNorm1D(3), nn.LSTM(3, 2))
            self.again = shared  # the same sublayer under a second name
            self.head = nn.Linear(3, 2, bias_attr=False)  # a None bias
            self.tied = nn.Linear(3, 2, bias_attr=False)
            self.tied.weight = self.head.weight
            self.register_buffer("steps", paddle.zeros([1]))
            self.register_buffer("nothing", None)

    net = Awkward()
    index = index_tensors(net)
    assert list(index.parameters) == [name for name, _ in net.named_parameters()]
    assert all(index.parameters[n] is p for n, p in net.named_parameters())
    assert list(index.buffers) == [n for n, b in net.named_buffers() if b is not None]
    assert [id(s) for s in index.sublayers] == [
        id(s) for _, s in net.named_sublayers(include_self=True)
    ]
    # The tied weight sits in both Linear layers' dicts; the shared layer once.
    assert len(index.slots[id(net.head.weight)]) == 2
    assert len(index.slots[id(net.again.weight)]) == 1


def test_unknown_name_is_a_clear_error():
    with pytest.raises(KeyError, match="not parameters or buffers"):
        with substituted(nn.Linear(2, 2), {"nope": paddle.zeros([1])}):
            pass


def test_running_statistics_are_the_batchnorm_stats():
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1D(3))
    assert sorted(running_statistics(net)) == ["1._mean", "1._variance"]
    assert "1._mean" not in adaptable_parameters(net)


def test_named_grad_reports_unused_and_checks_scalar():
    a = paddle.to_tensor([1.0, 2.0], stop_gradient=False)
    b = paddle.to_tensor([3.0], stop_gradient=False)
    grads = named_grad((a * a).sum(), {"a": a, "b": b})
    assert grads["b"] is None
    np.testing.assert_allclose(grads["a"].numpy(), [2.0, 4.0])
    with pytest.raises(ValueError, match="do not influence"):
        named_grad((a * a).sum(), {"a": a, "b": b}, allow_unused=False)
    with pytest.raises(ValueError, match="scalar"):
        named_grad(a * a, {"a": a})


def test_tune_allocator_applies_on_linux_glibc():
    import sys

    from paddlefsl.runtime import tune_allocator

    result = tune_allocator()
    if sys.platform.startswith("linux"):
        assert result is True
    else:
        assert result is False


@pytest.mark.parametrize(
    "vendor, preset, expected, value",
    [
        ("AuthenticAMD", None, True, "5"),  # AMD: the AVX2 path is switched on
        ("AuthenticAMD", "0", True, "0"),  # the user's own value is kept
        ("GenuineIntel", None, False, None),  # elsewhere nothing changes
        ("", None, False, None),  # vendor unknown: nothing changes
    ],
)
def test_unlock_mkl_on_amd_sets_the_switch_only_on_amd(
    monkeypatch, vendor, preset, expected, value
):
    from paddlefsl import runtime

    monkeypatch.setattr(runtime, "_cpu_vendor", lambda: vendor)
    monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    if preset is not None:
        monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", preset)
    assert runtime.unlock_mkl_on_amd() is expected
    assert os.environ.get("MKL_DEBUG_CPU_TYPE") == value


def test_cpu_vendor_is_read_on_linux_x86():
    import platform
    import sys

    from paddlefsl.runtime import _cpu_vendor

    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        pytest.skip("reads the vendor_id of /proc/cpuinfo, which x86 Linux has")
    vendor = _cpu_vendor()
    assert vendor and vendor.isalnum(), repr(vendor)  # e.g. GenuineIntel, AuthenticAMD


def test_named_grad_scale_multiplies_the_gradients_to_second_order():
    a = paddle.to_tensor([1.5, -2.0], dtype="float64", stop_gradient=False)
    grads = named_grad((a * a * a).sum(), {"a": a}, create_graph=True, scale=0.25)
    np.testing.assert_allclose(grads["a"].numpy(), 0.25 * 3 * a.numpy() ** 2, rtol=1e-15)
    (second,) = paddle.grad(grads["a"].sum(), [a])  # the scale is part of the graph
    np.testing.assert_allclose(second.numpy(), 0.25 * 6 * a.numpy(), rtol=1e-15)


def test_named_grad_explains_a_partial_request_through_a_multi_input_op():
    """The known limitation surfaces as an error that names the way out."""
    from paddlefsl import ops

    ops.install()
    net = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4))
    x = paddle.randn([2, 3, 6, 6])
    x.stop_gradient = False
    with pytest.raises(RuntimeError, match="uninstall") as info:
        named_grad(net(x).square().sum(), {"x": x})
    assert "should return None" in str(info.value)
