r"""Evaluate a cbfinn/maml Omniglot checkpoint with paddlefsl's evaluation.

The MAML reference code (github.com/cbfinn/maml, TensorFlow 1) tests on its own character
split with its own task sampling. To compare a model it trained with paddlefsl's runs on
the same footing, this script loads its weights into paddlefsl's ``--network reference``
Conv4 (no BatchNorm scale, epsilon 1e-3, offsets not adapted in the inner loop) with
``--conv-padding same`` (TensorFlow's ``SAME`` padding of a stride-2 convolution puts the odd
pixel of padding at the bottom and right: 28 -> 14 pads 0 above, 1 below) and scores them on
the fixed 600 test tasks of ``paddlefsl eval``, optionally paired per task with an
``eval_test.json`` of a paddlefsl model. TensorFlow stores the filters ``[kh, kw, in, out]``
(HWIO), Paddle ``[out, in, kh, kw]``: :func:`paddle_state` transposes them.

A TensorFlow checkpoint is read with TensorFlow (``pip install tensorflow-cpu``); the
``--dump`` option writes its arrays to an ``.npz`` that this script reads without it.

Example:
    python scripts/eval_cbfinn_checkpoint.py --checkpoint logs/.../model5000 \
        --data-root ../shared/data/omniglot --compare zoo/maml-omniglot-5w5s/eval_test.json

"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

# paddle is imported where it is used: --dump runs where only TensorFlow is installed.

#: Variable names of cbfinn/maml's Omniglot Conv4 (``maml.construct_conv_weights``): the
#: four convolution biases are unnamed ``tf.Variable``s, the BatchNorm offsets live in the
#: variable scopes ``model/0`` ... ``model/3`` (named as the TensorFlow 2 port names them;
#: :data:`TF_ALIASES` as TensorFlow 1 does).
TF_NAMES = {
    **{f"conv{i}": f"model/conv{i}" for i in range(1, 5)},
    "b1": "model/Variable",
    **{f"b{i}": f"model/Variable_{i - 1}" for i in range(2, 5)},
    **{f"beta{i}": f"model/{i - 1}/BatchNorm/beta" for i in range(1, 5)},
    "w5": "model/w5",
    "b5": "model/b5",
}


#: The offsets' names in a checkpoint of cbfinn/maml run with TensorFlow 1 itself:
#: ``tf.contrib.layers.batch_norm(..., scope="0")`` puts them in ``model/0/``, without the
#: ``BatchNorm`` scope that its default name (and the TensorFlow 2 port) adds.
TF_ALIASES = {f"beta{i}": f"model/{i - 1}/beta" for i in range(1, 5)}


def read_tf_checkpoint(prefix: str) -> dict[str, np.ndarray]:
    """The arrays of a cbfinn/maml checkpoint (``.../model5000``), keyed as :data:`TF_NAMES`.

    Raises:
        SystemExit: TensorFlow is not installed, or the checkpoint lacks a variable.

    """
    try:
        import tensorflow as tf  # noqa: PLC0415  (optional: only this reader needs it)
    except ImportError:
        raise SystemExit(
            "reading a TensorFlow checkpoint needs tensorflow (pip install tensorflow-cpu); "
            "or pass an .npz written by this script's --dump on a machine that has it"
        ) from None
    reader = tf.train.load_checkpoint(prefix)
    stored = reader.get_variable_to_shape_map()
    names = {
        key: name if name in stored else TF_ALIASES.get(key, name) for key, name in TF_NAMES.items()
    }
    missing = sorted(v for v in names.values() if v not in stored)
    if missing:
        raise SystemExit(
            f"{prefix} is not a cbfinn/maml Omniglot Conv4 checkpoint: missing {missing}"
        )
    return {key: reader.get_tensor(name) for key, name in names.items()}


def read_arrays(path: str) -> dict[str, np.ndarray]:
    """Arrays from an ``.npz`` (as ``--dump`` writes) or a TensorFlow checkpoint prefix."""
    if path.endswith(".npz"):
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
        missing = sorted(set(TF_NAMES) - set(arrays))
        if missing:
            raise SystemExit(f"{path} lacks {missing}; write it with --dump")
        return arrays
    return read_tf_checkpoint(path)


def paddle_state(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference Conv4's state-dict entries (float32) for the TensorFlow arrays."""
    state: dict[str, np.ndarray] = {}
    for i in range(4):
        state[f"features.{i}.0.weight"] = arrays[f"conv{i + 1}"].transpose(3, 2, 0, 1)
        state[f"features.{i}.0.bias"] = arrays[f"b{i + 1}"]
        state[f"features.{i}.1.bias"] = arrays[f"beta{i + 1}"]
    state["head.weight"] = arrays["w5"]
    state["head.bias"] = arrays["b5"]
    return {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in state.items()}


def load_into(model: Any, arrays: dict[str, np.ndarray]) -> None:
    """Copy the TensorFlow weights into paddlefsl's reference Conv4 (shapes checked).

    Raises:
        SystemExit: a shape does not match (another width, ways or network).

    """
    import paddle  # noqa: PLC0415

    own = model.state_dict()
    for key, value in paddle_state(arrays).items():
        if key not in own or list(own[key].shape) != list(value.shape):
            have = list(own[key].shape) if key in own else "nothing"
            raise SystemExit(
                f"{key}: the checkpoint has shape {list(value.shape)}, the model {have}; "
                "is it a 5-way, 64-channel Omniglot model?"
            )
        own[key].set_value(paddle.to_tensor(value))


def checkpoint_iteration(path: str) -> int | None:
    """The iteration in a checkpoint's name: cbfinn/maml saves ``model<iteration>``.

    ``.../model13000`` and ``ref13000.npz`` give 13000; a name without a trailing number gives
    ``None`` (give ``--iteration``).
    """
    match = re.search(r"(\d+)$", Path(path).name.removesuffix(".npz"))
    return int(match.group(1)) if match else None


def main(argv: list[str] | None = None) -> int:
    """Command line: evaluate (or ``--dump``) one checkpoint; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="TF checkpoint prefix or .npz")
    parser.add_argument("--dump", metavar="NPZ", help="only write the arrays to NPZ and exit")
    parser.add_argument("--data-root", help="folder with the Omniglot zips")
    parser.add_argument("--inner-steps-test", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--compare", help="an eval_test.json to pair the tasks with")
    parser.add_argument("--output", help="write the result as JSON here")
    parser.add_argument(
        "--iteration", type=int, help="the checkpoint's iteration (default: from its name)"
    )
    args = parser.parse_args(argv)

    arrays = read_arrays(args.checkpoint)
    if args.dump:
        np.savez(args.dump, **arrays)
        print(f"wrote {args.dump}")
        return 0

    from paddlefsl.runtime import use_cores
    from paddlefsl.train.builders import build_learner, build_tasks, eval_seed
    from paddlefsl.train.checkpoint import atomic_write_json
    from paddlefsl.train.config import build_config
    from paddlefsl.train.evaluate import (
        SAME_SETTING,
        evaluate,
        paired_difference,
        unpaired_fields,
    )

    use_cores(1)
    config, _ = build_config(
        preset="maml-omniglot-5w5s",
        network="reference",
        conv_padding="same",
        data_root=args.data_root,
        eval_tasks=args.tasks,
        inner_steps_test=args.inner_steps_test,
    )
    learner = build_learner(config)
    load_into(learner.module, arrays)
    tasks = build_tasks(config, "test", num_tasks=config.eval_tasks)
    result = evaluate(learner, tasks, config.inner_steps_test, "classification", by_step=True)
    report: dict[str, Any] = {
        "checkpoint": args.checkpoint,
        "iteration": args.iteration
        if args.iteration is not None
        else checkpoint_iteration(args.checkpoint),
        "split": "test",
        "task_seed": eval_seed("test"),
        "config": {k: getattr(config, k) for k in SAME_SETTING},  # as paddlefsl eval writes it
        **result.to_dict(),
    }
    line = (
        f"test accuracy {100 * result.mean:.2f}% +- {100 * result.ci95:.2f} "
        f"({result.num_tasks} tasks, {result.inner_steps} steps); by step: "
        + ", ".join(f"{100 * row['mean']:.2f}" for row in result.by_step)
    )
    if args.compare:
        other = json.loads(Path(args.compare).read_text())
        differing = unpaired_fields(other, report)
        if differing:
            raise SystemExit(
                f"{args.compare} differs in {', '.join(differing)}: it did not score these "
                "tasks, so they cannot be paired"
            )
        diff = paired_difference(other["values"], result.values)
        report["paired"] = {"against": args.compare, **vars(diff)}
        line += (
            f"; paired against {args.compare}: {100 * diff.mean:+.2f} +- "
            f"{100 * diff.ci95:.2f} points ({diff.better} tasks better, {diff.worse} worse)"
        )
    if args.output:
        atomic_write_json(args.output, report)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
