r"""Compare paddlefsl's MAML meta-gradient with cbfinn/maml's on the same weights and tasks.

One meta-batch of MAML Omniglot 5-way 5-shot (the preset with ``--network reference
--conv-padding same``) at a cbfinn/maml checkpoint's weights, differentiated by each code.
The ``tf`` step runs in an environment with TensorFlow (and, for ``--implementation
cbfinn``, a TensorFlow 2 ``compat.v1`` port of github.com/cbfinn/maml, which this
repository does not contain); the other two run with paddlefsl:

    python scripts/cbfinn_metagradient.py tasks --data-root DATA/omniglot --output tasks.npz
    ~/venv-tf/bin/python scripts/cbfinn_metagradient.py tf --weights ref16000.npz \
        --tasks tasks.npz --output tf.npz --implementation cbfinn --cbfinn ~/peers/maml-tf
    python scripts/cbfinn_metagradient.py compare --weights ref16000.npz --tasks tasks.npz \
        --reference tf.npz

``--weights`` is an ``.npz`` written by ``eval_cbfinn_checkpoint.py --dump``.

``--implementation eager`` computes the same meta-gradient with TensorFlow eager ops written
here (SAME convolutions, batch-statistics BatchNorm without scale, offsets outside the
inner step), in float64 with ``--dtype float64``: a precision reference for both codes.

cbfinn/maml's losses are summed over a task's queries and divided by the shots, five times
paddlefsl's mean at 5-way 5-shot; its inner learning rate 0.4 is paddlefsl's 2.0. A ``tf``
result is stored in cbfinn/maml's scale and layout; ``compare`` converts it.

A float32 difference far above rounding (1e-2 of the largest entry) need not be an error
of either code: the meta-gradient is discontinuous where an activation sits on a ReLU's
kink, and a rounding error then picks the other side. ``precision`` tells the two apart,
task by task, with paddlefsl alone: float32 against float64, and for each task above the
tolerance, float64 again at weights moved by a relative 1e-6; a task whose float64
meta-gradient jumps as far is at a kink:

    python scripts/cbfinn_metagradient.py precision --weights ref16000.npz --tasks tasks.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_cbfinn_checkpoint import TF_NAMES, load_into, paddle_state, read_arrays  # noqa: E402

WAYS, SHOTS = 5, 5
#: cbfinn/maml's loss over paddlefsl's (summed over 25 queries, divided by 5 shots).
LOSS_SCALE = WAYS * SHOTS / SHOTS
TASK_KEYS = ("support_x", "support_y", "query_x", "query_y")
INNER_KEYS = [f"conv{i}" for i in range(1, 5)] + [f"b{i}" for i in range(1, 5)] + ["w5", "b5"]
OFFSET_KEYS = [f"beta{i}" for i in range(1, 5)]


def write_tasks(data_root: str, output: str, count: int, first: int) -> None:
    """Training tasks ``first ... first + count - 1`` of the preset's stream, as arrays."""
    from paddlefsl.train.builders import build_tasks
    from paddlefsl.train.config import build_config

    config, _ = build_config("maml-omniglot-5w5s", network="reference", data_root=data_root)
    source = build_tasks(config, "train")
    tasks = [source.sample(first + i) for i in range(count)]
    np.savez(output, **{k: np.stack([getattr(t, k) for t in tasks]) for k in TASK_KEYS})


def paddle_metagradient(
    weights: dict[str, np.ndarray],
    tasks: dict[str, np.ndarray],
    conv_padding: str = "same",
    dtype: str = "float32",
) -> tuple[dict[str, np.ndarray], float]:
    """The meta-gradient paddlefsl computes (state-dict keys) and its meta-loss (task mean)."""
    import paddle
    import paddle.nn.functional as F  # noqa: N812

    from paddlefsl.train.builders import build_learner
    from paddlefsl.train.config import build_config

    config, _ = build_config("maml-omniglot-5w5s", network="reference", conv_padding=conv_padding)
    learner = build_learner(config)
    load_into(learner.module, weights)
    learner.to(dtype=dtype)
    learner.train()  # batch statistics, as cbfinn/maml always uses
    count = len(tasks["support_x"])
    total = 0.0
    for b in range(count):
        sx, sy, qx, qy = (paddle.to_tensor(tasks[k][b]) for k in TASK_KEYS)
        clone = learner.clone()
        clone.adapt(F.cross_entropy(clone(sx.astype(dtype)), sy))
        loss = F.cross_entropy(clone(qx.astype(dtype)), qy) / count
        loss.backward()
        total += float(loss)
    grads = {
        name: p.grad.numpy().astype(np.float64)
        for name, p in learner.module.named_parameters()
        if p.grad is not None
    }
    return grads, total


def cbfinn_layout(grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of ``paddle_state``: state-dict keys and layouts to cbfinn/maml's."""
    arrays = {}
    for i in range(4):
        arrays[f"conv{i + 1}"] = grads[f"features.{i}.0.weight"].transpose(2, 3, 1, 0)
        arrays[f"b{i + 1}"] = grads[f"features.{i}.0.bias"]
        arrays[f"beta{i + 1}"] = grads[f"features.{i}.1.bias"]
    arrays["w5"], arrays["b5"] = grads["head.weight"], grads["head.bias"]
    return arrays


def compare(
    grads: dict[str, np.ndarray], reference: dict[str, np.ndarray], floor: float = 1e-4
) -> tuple[list[tuple[str, float, float, bool]], float]:
    """:func:`differences` from a ``tf`` result (cbfinn/maml's scale and layout)."""
    wanted = paddle_state({k: v / LOSS_SCALE for k, v in reference.items() if k in TF_NAMES})
    return differences(grads, wanted, floor)


def differences(
    grads: dict[str, np.ndarray], reference: dict[str, np.ndarray], floor: float = 1e-4
) -> tuple[list[tuple[str, float, float, bool]], float]:
    """Per-parameter rows (key, largest reference entry, difference, counted); the worst.

    The relative difference divides by the largest entry of that parameter's reference
    gradient. Parameters whose reference gradient is below ``floor`` times the largest of
    all (a convolution bias right before BatchNorm has an exactly zero gradient, so both
    codes return rounding noise) are listed but left out of the worst.
    """
    largest = max(float(np.abs(v).max()) for v in reference.values())
    rows, worst = [], 0.0
    for key, want in reference.items():
        scale = float(np.abs(want).max())
        rel = float(np.abs(grads[key] - want).max()) / max(scale, 1e-300)
        counted = scale >= floor * largest
        rows.append((key, scale, rel, counted))
        if counted:
            worst = max(worst, rel)
    return rows, worst


def task_precision(
    weights: dict[str, np.ndarray],
    tasks: dict[str, np.ndarray],
    tolerance: float = 1e-3,
    perturbation: float = 1e-6,
    probes: int = 4,
    seed: int = 0,
    metagradient: Any = None,
) -> list[tuple[int, float, float | None]]:
    """Per task: float32's difference from float64, and for a large one, float64's own jump.

    Args:
        weights: cbfinn/maml's arrays (``read_arrays``).
        tasks: The meta-batch (``write_tasks``'s arrays).
        tolerance: A float32 difference above this is probed.
        perturbation: Relative size of the random weight moves of a probe.
        probes: How many moves; the largest float64 jump is reported.
        seed: Seed of the moves.
        metagradient: ``(weights, tasks, dtype) -> grads``; paddlefsl's by default.

    Returns:
        ``(task, float32 difference, float64 jump or None when not probed)`` per task. A
        jump as large as the difference means the task sits at a kink of the
        meta-gradient: the difference is the function's, not a rounding error.

    """
    if metagradient is None:

        def metagradient(w: dict, t: dict, dtype: str) -> dict:
            return paddle_metagradient(w, t, "same", dtype)[0]

    rng = np.random.default_rng(seed)
    rows = []
    for index in range(len(tasks["support_x"])):
        one = {k: v[index : index + 1] for k, v in tasks.items()}
        exact = metagradient(weights, one, "float64")
        difference = differences(metagradient(weights, one, "float32"), exact)[1]
        jump = None
        if difference > tolerance:
            jump = 0.0
            for _ in range(probes):
                moved = {
                    k: (v * (1 + perturbation * rng.standard_normal(v.shape))).astype(v.dtype)
                    for k, v in weights.items()
                }
                jump = max(jump, differences(metagradient(moved, one, "float64"), exact)[1])
        rows.append((index, difference, jump))
    return rows


def tf_metagradient(
    weights: dict[str, np.ndarray],
    tasks: dict[str, np.ndarray],
    implementation: str,
    dtype: str,
    cbfinn: str | None,
) -> dict[str, Any]:
    """TensorFlow's meta-gradient and loss, in cbfinn/maml's scale and layout."""
    if implementation == "cbfinn":
        if dtype != "float32":
            raise SystemExit("cbfinn/maml's graph is float32 only; use --implementation eager")
        if not cbfinn:
            raise SystemExit("--implementation cbfinn needs --cbfinn DIR (its code)")
        return _cbfinn_graph(weights, tasks, cbfinn)
    return _eager(weights, tasks, dtype)


def _cbfinn_graph(weights: dict[str, np.ndarray], tasks: dict[str, np.ndarray], cbfinn: str):
    sys.path.insert(0, cbfinn)
    sys.argv = sys.argv[:1]
    import main  # noqa: F401, PLC0415  (cbfinn/maml's flags)
    import tensorflow.compat.v1 as tf  # noqa: PLC0415
    from absl import flags  # noqa: PLC0415
    from maml import MAML  # noqa: PLC0415

    count = len(tasks["support_x"])
    flags.FLAGS(
        ["cbfinn", "--datasource=omniglot", f"--num_classes={WAYS}",
         f"--update_batch_size={SHOTS}", "--update_lr=0.4", "--num_updates=1",
         f"--meta_batch_size={count}", "--norm=batch_norm", "--num_filters=64"]
    )  # fmt: skip
    model = MAML(28 * 28, WAYS, test_num_updates=1)
    model.construct_model(input_tensors=None, prefix="metatrain_")
    variables = tf.trainable_variables()
    key_of = {name: key for key, name in TF_NAMES.items()}
    keys = [key_of[v.op.name] for v in variables]
    grads = tf.gradients(model.total_losses2[0], variables)

    def flat(x: np.ndarray) -> np.ndarray:
        return x.reshape(x.shape[0], x.shape[1], -1).astype(np.float32)

    def one_hot(y: np.ndarray) -> np.ndarray:
        return np.eye(WAYS, dtype=np.float32)[y]

    feed = {
        model.inputa: flat(tasks["support_x"]),
        model.labela: one_hot(tasks["support_y"]),
        model.inputb: flat(tasks["query_x"]),
        model.labelb: one_hot(tasks["query_y"]),
    }
    with tf.Session() as session:
        session.run(tf.global_variables_initializer())
        for variable, key in zip(variables, keys, strict=True):
            variable.load(weights[key], session)
        values, loss = session.run([grads, model.total_losses2[0]], feed)
    return {**dict(zip(keys, values, strict=True)), "loss": np.float64(loss)}


def _eager(weights: dict[str, np.ndarray], tasks: dict[str, np.ndarray], dtype: str):
    import tensorflow as tf  # noqa: PLC0415

    var = {k: tf.Variable(weights[k].astype(dtype)) for k in INNER_KEYS + OFFSET_KEYS}

    def forward(x: Any, p: dict[str, Any]) -> Any:
        h = x
        for i in range(1, 5):
            h = tf.nn.conv2d(h, p[f"conv{i}"], [1, 2, 2, 1], "SAME") + p[f"b{i}"]
            mean = tf.reduce_mean(h, [0, 1, 2], keepdims=True)
            variance = tf.reduce_mean(tf.square(h - mean), [0, 1, 2], keepdims=True)
            h = tf.nn.relu((h - mean) * tf.math.rsqrt(variance + 1e-3) + var[f"beta{i}"])
        return tf.matmul(tf.reduce_mean(h, [1, 2]), p["w5"]) + p["b5"]

    def xent(logits: Any, labels: np.ndarray) -> Any:  # summed / shots, as cbfinn/maml
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        return tf.reduce_sum(per_example) / SHOTS

    count = len(tasks["support_x"])
    with tf.GradientTape() as outer:
        total = tf.constant(0.0, dtype)
        for b in range(count):
            sx, qx = (tasks[k][b].transpose(0, 2, 3, 1).astype(dtype) for k in TASK_KEYS[::2])
            inner = {k: var[k] for k in INNER_KEYS}
            with tf.GradientTape() as tape:
                loss = xent(forward(sx, inner), tasks["support_y"][b])
            steps = tape.gradient(loss, [inner[k] for k in INNER_KEYS])
            fast = {k: inner[k] - 0.4 * g for k, g in zip(INNER_KEYS, steps, strict=True)}
            total += xent(forward(qx, fast), tasks["query_y"][b]) / count
    keys = INNER_KEYS + OFFSET_KEYS
    grads = outer.gradient(total, [var[k] for k in keys])
    return {**{k: g.numpy() for k, g in zip(keys, grads, strict=True)}, "loss": total.numpy()}


def main(argv: list[str] | None = None) -> int:
    """Command line; see the module docstring. ``compare`` returns 1 above ``--tolerance``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tasks = sub.add_parser("tasks", help="write a meta-batch of training tasks")
    tasks.add_argument("--data-root", required=True)
    tasks.add_argument("--output", required=True)
    tasks.add_argument("--count", type=int, default=32)
    tasks.add_argument("--first", type=int, default=100_000, help="first task index")
    tf_step = sub.add_parser("tf", help="TensorFlow's meta-gradient (needs tensorflow)")
    compare_step = sub.add_parser("compare", help="paddlefsl's against a tf result")
    for step in (tf_step, compare_step):
        step.add_argument("--weights", required=True, help=".npz of eval_cbfinn --dump")
        step.add_argument("--tasks", required=True)
        step.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    tf_step.add_argument("--output", required=True)
    tf_step.add_argument("--implementation", choices=("cbfinn", "eager"), default="cbfinn")
    tf_step.add_argument("--cbfinn", help="folder of cbfinn/maml's code (TF 2 port)")
    compare_step.add_argument("--reference", required=True, help="the tf step's output")
    compare_step.add_argument("--conv-padding", choices=("same", "symmetric"), default="same")
    compare_step.add_argument("--tolerance", type=float, default=1e-3)
    precision = sub.add_parser("precision", help="paddlefsl float32 against float64, per task")
    precision.add_argument("--weights", required=True, help=".npz of eval_cbfinn --dump")
    precision.add_argument("--tasks", required=True)
    precision.add_argument("--tolerance", type=float, default=1e-3)
    precision.add_argument("--perturbation", type=float, default=1e-6)
    precision.add_argument("--probes", type=int, default=4)
    args = parser.parse_args(argv)

    if args.command == "tasks":
        write_tasks(args.data_root, args.output, args.count, args.first)
        print(f"wrote {args.count} tasks to {args.output}")
        return 0
    weights = read_arrays(args.weights)
    with np.load(args.tasks) as data:
        batch = {k: data[k] for k in TASK_KEYS}
    if args.command == "precision":
        rows = task_precision(weights, batch, args.tolerance, args.perturbation, args.probes)
        unexplained = 0
        for index, difference, jump in rows:
            if jump is None:
                print(f"  task {index:3d}: float32 - float64 {difference:.2e}")
                continue
            kink = jump >= difference / 2
            unexplained += not kink
            verdict = "a kink: the function's own jump" if kink else "NOT explained by a kink"
            print(
                f"  task {index:3d}: float32 - float64 {difference:.2e}; float64 moves "
                f"{jump:.2e} under a relative {args.perturbation:g} weight change: {verdict}"
            )
        worst = max((d for _, d, j in rows if j is None), default=0.0)
        probed = sum(jump is not None for _, _, jump in rows)
        print(
            f"{len(rows)} tasks; {probed} above {args.tolerance:g}, {unexplained} of them not "
            f"at a kink; the others' worst {worst:.2e}"
        )
        return 0 if unexplained == 0 else 1
    if args.command == "tf":
        result = tf_metagradient(weights, batch, args.implementation, args.dtype, args.cbfinn)
        np.savez(args.output, **{k: np.asarray(v, np.float64) for k, v in result.items()})
        print(f"{args.implementation} ({args.dtype}): loss {float(result['loss']):.8f}")
        return 0
    with np.load(args.reference) as data:
        reference = {k: data[k] for k in data.files}
    grads, loss = paddle_metagradient(weights, batch, args.conv_padding, args.dtype)
    rows, worst = compare(grads, reference)
    print(f"meta-loss: paddlefsl {loss:.8f}, reference {float(reference['loss']) / LOSS_SCALE:.8f}")
    for key, scale, rel, counted in rows:
        note = "" if counted else "  (not counted: zero in exact arithmetic, both are rounding)"
        print(f"  {key:22s} largest |g| {scale:.3e}  max difference / largest {rel:.2e}{note}")
    verdict = "within" if worst <= args.tolerance else "ABOVE"
    print(f"worst relative difference {worst:.2e}: {verdict} the tolerance {args.tolerance:g}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
