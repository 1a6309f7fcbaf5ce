"""Fused recurrent layers (``paddle.nn.SimpleRNN`` / ``GRU`` / ``LSTM``) in second order.

Those layers run one fused kernel, ``_C_ops.rnn``, whose gradient Paddle 3.3.1 cannot
differentiate again ("The Op rnn_grad doesn't have any grad op"). Inside
:func:`~paddlefsl.ops.second_order_scope` the replacement below computes the same
recurrence from matmuls and elementwise ops, which all have double gradients, so a
second-order ``adapt`` works on an unmodified recurrent model, padded batches
(``sequence_length``) included. Outside the scope, and with dropout between stacked
layers in training (drawn by the kernel's own generator), the native kernel runs:
forward and first-order passes are untouched.

The weight list is the fused kernel's layout (``paddle.nn.RNNBase.flatten_parameters``):
``weight_ih`` and ``weight_hh`` of every (layer, direction), then their biases in the same
order. Gates follow Paddle's cells: LSTM ``i, f, g, o``; GRU ``r, z, c`` with
``c = tanh(x_c + r * (h W_hc + b_hc))`` and ``h' = z * h + (1 - z) * c``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import paddle

from ._common import tracks_grad
from ._registry import in_second_order_scope, register

Tensor = paddle.Tensor

_MODES = frozenset({"LSTM", "GRU", "RNN_TANH", "RNN_RELU"})


def _cell(mode: str, x_gates: Tensor, h_gates: Tensor, h: Tensor, c: Tensor | None):
    """One step: new hidden state (and LSTM cell state) from the two gate projections."""
    if mode == "LSTM":
        i, f, g, o = paddle.split(x_gates + h_gates, 4, axis=-1)
        c = paddle.nn.functional.sigmoid(f) * c + paddle.nn.functional.sigmoid(i) * paddle.tanh(g)
        return paddle.nn.functional.sigmoid(o) * paddle.tanh(c), c
    if mode == "GRU":
        x_r, x_z, x_c = paddle.split(x_gates, 3, axis=-1)
        h_r, h_z, h_c = paddle.split(h_gates, 3, axis=-1)
        r = paddle.nn.functional.sigmoid(x_r + h_r)
        z = paddle.nn.functional.sigmoid(x_z + h_z)
        candidate = paddle.tanh(x_c + r * h_c)
        return z * h + (1.0 - z) * candidate, None
    pre = x_gates + h_gates
    return (paddle.tanh(pre) if mode == "RNN_TANH" else paddle.nn.functional.relu(pre)), None


def recurrence(
    x: Tensor,
    pre_state: Sequence[Tensor],
    weights: Sequence[Tensor],
    bidirectional: bool,
    num_layers: int,
    mode: str,
    lengths: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """The fused RNN kernel's result from differentiable ops (without dropout).

    Args:
        x: Time-major input ``[T, B, I]``.
        pre_state: Initial states, each ``[layers * directions, B, H]``: ``[h]``, or
            ``[h, c]`` for LSTM.
        weights: The kernel's weight list (all ``weight_ih`` / ``weight_hh``, then all
            biases).
        bidirectional: Whether each layer also runs backwards in time.
        num_layers: Stacked layers.
        mode: ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"`` or ``"RNN_RELU"``.
        lengths: Valid steps per sequence ``[B]`` (``sequence_length``): past them the
            state is carried unchanged and the output is 0, as in the kernel.

    Returns:
        The output ``[T, B, directions * H]`` and the final states, shaped as
        ``pre_state``.

    Example:
        >>> import paddle
        >>> gru = paddle.nn.GRU(3, 4)
        >>> x = paddle.randn([5, 2, 3])  # time-major
        >>> out, (h,) = recurrence(x, [paddle.zeros([1, 2, 4])], gru._all_weights,
        ...                        False, 1, "GRU")
        >>> list(out.shape), list(h.shape)
        ([5, 2, 4], [1, 2, 4])

    """
    directions = 2 if bidirectional else 1
    count = num_layers * directions
    h0 = paddle.unbind(pre_state[0], axis=0)
    c0 = paddle.unbind(pre_state[1], axis=0) if mode == "LSTM" else [None] * count
    final_h: list[Tensor] = []
    final_c: list[Tensor] = []
    masks: list[Tensor | None] = [None] * x.shape[0]
    if lengths is not None:
        steps_index = paddle.arange(x.shape[0], dtype=lengths.dtype).reshape([-1, 1])
        valid = (steps_index < lengths.reshape([1, -1])).astype(x.dtype)  # [T, B]
        masks = list(paddle.unbind(valid.unsqueeze(-1), axis=0))  # T x [B, 1]
    layer_input = x
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w_ih, w_hh = weights[2 * k], weights[2 * k + 1]
            b_ih, b_hh = weights[2 * count + 2 * k], weights[2 * count + 2 * k + 1]
            # All steps' input projections at once; only the recurrent part is sequential.
            x_gates = paddle.unbind(paddle.matmul(layer_input, w_ih, transpose_y=True) + b_ih)
            h, c = h0[k], c0[k]
            steps: list[Tensor | None] = [None] * len(x_gates)
            order = range(len(x_gates)) if direction == 0 else reversed(range(len(x_gates)))
            for t in order:
                h_gates = paddle.matmul(h, w_hh, transpose_y=True) + b_hh
                h_new, c_new = _cell(mode, x_gates[t], h_gates, h, c)
                m = masks[t]
                if m is None:
                    h, c = h_new, c_new
                    steps[t] = h
                else:  # a finished sequence keeps its state and outputs 0
                    h = m * h_new + (1.0 - m) * h
                    c = None if c is None else m * c_new + (1.0 - m) * c
                    steps[t] = m * h_new
            outputs.append(paddle.stack(steps))
            final_h.append(h)
            final_c.append(c)
        layer_input = outputs[0] if directions == 1 else paddle.concat(outputs, axis=-1)
    states = [paddle.stack(final_h)]
    if mode == "LSTM":
        states.append(paddle.stack(final_c))
    return layer_input, states


def _covered(pre_state, weights, sequence_length, dropout_prob, num_layers, mode, is_test):
    shapes_ok = (
        isinstance(weights, (list, tuple))
        and isinstance(pre_state, (list, tuple))
        and mode in _MODES
        and len(pre_state) == (2 if mode == "LSTM" else 1)
    )
    # The dropout between stacked layers draws from the kernel's own generator.
    no_dropout = is_test or not dropout_prob or num_layers == 1
    lengths_ok = sequence_length is None or isinstance(sequence_length, Tensor)
    return shapes_ok and lengths_ok and no_dropout


@register("rnn")
def _rnn(native_fn: Callable) -> Callable:
    def rnn(*args, **kwargs):
        # _C_ops.rnn(x, pre_state, weight_list, sequence_length, dropout_state_in,
        #            dropout_prob, is_bidirec, input_size, hidden_size, num_layers, mode,
        #            seed, is_test)
        if kwargs or len(args) != 13 or not in_second_order_scope():
            return native_fn(*args, **kwargs)
        x, pre_state, weights, sequence_length, dropout_state, dropout_prob = args[:6]
        bidirectional, num_layers, mode, is_test = args[6], args[9], args[10], args[12]
        if (
            not _covered(
                pre_state, weights, sequence_length, dropout_prob, num_layers, mode, is_test
            )
            or len(weights) != 4 * num_layers * (2 if bidirectional else 1)
            or not tracks_grad(x, *pre_state, *weights)
        ):
            return native_fn(*args)
        out, states = recurrence(
            x, pre_state, weights, bidirectional, num_layers, mode, sequence_length
        )
        return out, dropout_state, states

    return rnn
