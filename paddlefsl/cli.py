"""The ``paddlefsl`` command: ``train``, ``eval``, ``export`` and the ``sinusoid`` demo.

Usage errors (bad options, missing data, a resume with a different configuration)
print one line and exit with code 2; a NaN / inf loss exits with 1; SIGINT / SIGTERM
save a checkpoint and exit with 128 + the signal number. See ``docs/cli.md``.

Example:
    >>> main(["train", "--preset", "maml-omniglot-5w1s", "--data-root", "data/omniglot",
    ...       "--output", "runs/omniglot-5w1s"])  # doctest: +SKIP
    >>> main(["eval", "--checkpoint", "runs/omniglot-5w1s"])  # doctest: +SKIP
    >>> main(["export", "--checkpoint", "runs/omniglot-5w1s",
    ...       "--output", "zoo/omniglot-5w1s"])  # doctest: +SKIP

"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["build_parser", "main"]

DOCS = "docs/cli.md"
_SPLITS = ("train", "val", "test")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _fail(prog: str, message: Any, code: int = 2) -> NoReturn:
    text = " ".join(str(message).split())  # one line, whatever the exception held
    print(f"{prog}: error: {text}", file=sys.stderr)
    raise SystemExit(code)


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from .train.config import (
        ALGORITHMS,
        CONV_PADDINGS,
        DATASETS,
        META_LR_SCHEDULES,
        NETWORKS,
        OMNIGLOT_ROTATIONS,
    )
    from .train.presets import PRESETS

    s = argparse.SUPPRESS  # unset options stay absent, so the preset can fill them
    p.add_argument(
        "--preset",
        metavar="NAME",
        default=s,
        help=f"named paper configuration: {', '.join(PRESETS)}; options given "
        "explicitly override it",
    )
    p.add_argument(
        "--algorithm",
        choices=ALGORITHMS,
        default=s,
        help="maml (second order), fomaml (first order), anil (head-only inner loop) or "
        "metasgd (a learned learning rate per weight, starting at --inner-lr); default maml",
    )
    p.add_argument("--dataset", choices=DATASETS, default=s, help="default omniglot")
    p.add_argument(
        "--data-root",
        metavar="DIR",
        default=s,
        help=f"dataset folder (not needed for sinusoid); see {DOCS}#data",
    )
    p.add_argument(
        "--output",
        metavar="DIR",
        default=s,
        help="run folder for config.json, metrics.jsonl and checkpoints/ "
        "(default runs/<preset or algorithm-dataset-NwKs>)",
    )
    group = p.add_argument_group("task")
    group.add_argument("--ways", type=int, default=s, help="classes per task (N)")
    group.add_argument("--shots", type=int, default=s, help="support examples per class (K)")
    group.add_argument(
        "--queries",
        type=int,
        default=s,
        help="query examples per class (default 15 for miniImageNet, else K)",
    )
    group = p.add_argument_group("optimisation")
    group.add_argument("--meta-batch-size", type=int, default=s, help="tasks per meta-update")
    group.add_argument(
        "--inner-steps", type=int, default=s, help="inner-loop steps during meta-training"
    )
    group.add_argument(
        "--inner-steps-test",
        type=int,
        default=s,
        help="inner-loop steps for validation and evaluation",
    )
    group.add_argument("--inner-lr", type=float, default=s, help="inner-loop learning rate")
    group.add_argument("--meta-lr", type=float, default=s, help="Adam meta learning rate")
    group.add_argument(
        "--meta-lr-schedule",
        choices=META_LR_SCHEDULES,
        default=s,
        help="constant (default, the papers') or cosine: annealed to 0 at --iterations",
    )
    group.add_argument(
        "--meta-grad-clip",
        type=float,
        default=s,
        help="clip each meta-gradient element to [-C, C] (0: off; miniImageNet default: "
        "cbfinn/maml's clip, 10 * shots / (ways * queries) on the mean loss)",
    )
    group.add_argument("--iterations", type=int, default=s, help="meta-updates in the run")
    group.add_argument("--seed", type=int, default=s, help="initialisation and task seed")
    group.add_argument(
        "--task-pool",
        type=int,
        default=s,
        metavar="N",
        help="train on a fixed pool of N tasks, cycled in order (cbfinn/maml uses 200000); "
        "default: a fresh task every time",
    )
    group = p.add_argument_group("model")
    group.add_argument(
        "--hidden",
        type=int,
        default=s,
        help="Conv4 channels / MLP width (64 Omniglot, 32 miniImageNet)",
    )
    group.add_argument(
        "--pooling",
        choices=("max", "stride"),
        default=s,
        help="Conv4 max-pooling or strided convolutions",
    )
    group.add_argument("--image-size", type=int, default=s, help="image side in pixels")
    group.add_argument(
        "--network",
        choices=NETWORKS,
        default=s,
        help="Conv4 details: default (Paddle's) or reference (cbfinn/maml's BatchNorm "
        "without scale, offsets not adapted in the inner loop, its initialisation); "
        f"see {DOCS}#networks",
    )
    group.add_argument(
        "--conv-padding",
        choices=CONV_PADDINGS,
        default=s,
        help="Conv4 padding: symmetric (1 pixel on every side, default) or same "
        "(TensorFlow's SAME, as cbfinn/maml: stride-2 convolutions pad below and right only)",
    )
    group.add_argument(
        "--omniglot-scheme",
        choices=("maml", "vinyals"),
        default=s,
        help="Omniglot class split (default maml)",
    )
    group.add_argument(
        "--omniglot-antialias",
        action="store_const",
        const=True,
        default=s,
        help="resize Omniglot in greyscale (smooth edges, as torchvision loaders do) "
        "instead of cbfinn/maml's binary nearest-neighbour images",
    )
    group.add_argument(
        "--omniglot-rotations",
        choices=OMNIGLOT_ROTATIONS,
        default=s,
        help="classes: rotations are extra classes (default); per-task: training tasks "
        "turn each character by its own random multiple of 90 degrees (cbfinn/maml)",
    )
    group = p.add_argument_group("run")
    group.add_argument(
        "--eval-every", type=int, default=s, help="validate every N iterations (0: at the end only)"
    )
    group.add_argument(
        "--checkpoint-every",
        type=int,
        default=s,
        help="save the last checkpoint every N iterations (0: at the end)",
    )
    group.add_argument(
        "--keep-every",
        type=int,
        default=s,
        help="also keep every N-th iteration's checkpoint for good, as "
        "checkpoints/kept-NNNNNNN.json, to score later with 'paddlefsl eval' (0: none)",
    )
    group.add_argument(
        "--log-every",
        type=int,
        default=s,
        help="write a training row to metrics.jsonl every N iterations",
    )
    group.add_argument(
        "--val-tasks",
        type=int,
        default=s,
        help="fixed validation tasks (0: no validation, no best checkpoint)",
    )
    group.add_argument(
        "--eval-tasks", type=int, default=s, help="test tasks for 'paddlefsl eval' (default 600)"
    )
    group.add_argument("--num-workers", type=int, default=s, help="task-loading threads")
    group.add_argument(
        "--nproc",
        type=int,
        default=s,
        help="processes sharing each meta-batch via paddle.distributed (gloo on "
        "CPU): one per core uses the whole machine; default 1",
    )
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output from its last checkpoint",
    )
    group.add_argument(
        "--init-from",
        default=s,
        metavar="DIR_OR_FILE",
        help="start a new run from these weights (a run folder's best checkpoint, a "
        "model-zoo export or a checkpoint file) instead of a random initialisation; "
        "the optimizer starts afresh",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_checkpoint_options(
    parser: argparse.ArgumentParser, sources: str, verb: str, extra: str = ""
) -> None:
    """--checkpoint (what it may name: ``sources``) and --which (which record of a folder)."""
    parser.add_argument("--checkpoint", required=True, metavar="DIR_OR_FILE", help=sources)
    parser.add_argument(
        "--which",
        choices=("best", "last", "kept") if extra else ("best", "last"),
        default="best",
        help=f"checkpoint of a folder to {verb} (default best, else last){extra}",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``paddlefsl`` command."""
    parser = _Parser(
        prog="paddlefsl",
        description="Meta-learning with paddlefsl: train, evaluate, compare, status, export, "
        f"demo. Documentation: {DOCS}.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    train = sub.add_parser(
        "train",
        help="meta-train MAML / FOMAML / ANIL",
        description="Meta-train a model; resumable, see " + DOCS,
    )
    _add_train_options(train)
    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on 600 fixed test tasks",
        description="Mean accuracy (MSE for sinusoid) and 95% confidence "
        "interval on a fixed, seeded set of tasks.",
    )
    _add_checkpoint_options(
        ev,
        "run folder, its checkpoints/ folder, an export folder, a record .json or a .pdparams",
        "use",
        "; kept: every checkpoint the run kept (train --keep-every), a learning curve on the tasks",
    )
    ev.add_argument("--split", choices=_SPLITS, default="test", help="default test")
    ev.add_argument("--eval-tasks", type=int, default=None, help="number of tasks (600)")
    ev.add_argument(
        "--inner-steps-test", type=int, default=None, help="adaptation steps (default: the run's)"
    )
    ev.add_argument(
        "--data-root",
        default=None,
        metavar="DIR",
        help="dataset folder, if it moved since training (required for an exported model)",
    )
    ev.add_argument(
        "--output",
        default=None,
        metavar="DIR",
        help="where to write eval_<split>.json (default: the run folder; <run>/kept-NNNNNNN "
        "for a kept checkpoint; with --which kept, the folder of the kept-NNNNNNN folders)",
    )
    ev.add_argument(
        "--baseline",
        default=None,
        metavar="EVAL",
        help="also compare with this eval_<split>.json (or its folder), paired per task as "
        "'paddlefsl compare' does",
    )
    ev.add_argument(
        "--follow",
        action="store_true",
        help="with --which kept: while the run trains, wait for new kept checkpoints and "
        "score each as it appears; stop when the run stops",
    )
    ev.add_argument(
        "--by-step",
        action="store_true",
        help="also report the metric before adaptation and after every inner step, as the "
        "MAML reference code does (one extra query pass per step)",
    )
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    cmp = sub.add_parser(
        "compare",
        help="paired comparison of two evaluations on the same tasks",
        description="Per-task difference CANDIDATE - BASELINE of two 'paddlefsl eval' results "
        "on the same fixed tasks, with its 95% confidence interval and the number of tasks "
        "each model wins.",
    )
    for name in ("baseline", "candidate"):
        cmp.add_argument(
            name,
            metavar=name.upper(),
            help="an eval_<split>.json, or the folder it was written to",
        )
    cmp.add_argument(
        "--split",
        choices=_SPLITS,
        default="test",
        help="which eval_<split>.json of a folder (default test)",
    )
    st = sub.add_parser(
        "status",
        help="where runs stand: training or stopped, iteration, speed, time left, accuracy",
        description="Read run folders (never written to): whether a process is training "
        "there, the iteration against the target, iterations/s and time left, the recent "
        "training loss and metric, the last and best validation, the last checkpoint.",
    )
    st.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run folder (--output of train), or a folder holding run folders",
    )
    st.add_argument("--json", action="store_true", help="one JSON object per run instead")
    ex = sub.add_parser(
        "export",
        help="copy a run's checkpoint into a small folder to share (weights only)",
        description="Write model.pdparams, best.json and metrics.jsonl of a run's checkpoint "
        "into a new folder, without the optimizer state, random states or local paths; "
        "'paddlefsl eval --checkpoint DIR --data-root ...' evaluates it.",
    )
    _add_checkpoint_options(
        ex, "run folder, its checkpoints/ folder, a record .json or a .pdparams", "export"
    )
    ex.add_argument("--output", required=True, metavar="DIR", help="the export folder")
    ex.add_argument(
        "--force", action="store_true", help="replace a different export already in --output"
    )
    sub.add_parser(
        "sinusoid",
        add_help=False,
        help="the MAML sinusoid regression demo (options: paddlefsl sinusoid --help)",
    )
    return parser


# ---------------------------------------------------------------------- train
def _default_output(preset: str | None, given: dict[str, Any]) -> str:
    if preset:
        return str(Path("runs") / preset)
    from .train.config import build_config

    cfg, _ = build_config(None, **given)
    return str(Path("runs") / f"{cfg.algorithm}-{cfg.dataset}-{cfg.ways}w{cfg.shots}s")


def _train_config(args: argparse.Namespace) -> Any:
    from .train.checkpoint import CHECKPOINT_DIR
    from .train.config import (
        TrainConfig,
        build_config,
        check_resume,
        load_config,
        runtime_fields,
    )
    from .train.errors import ConfigError

    given = {k: v for k, v in vars(args).items() if k in TrainConfig.fields()}
    preset = given.pop("preset", None)
    output = given.get("output") or _default_output(preset, given)
    given["output"] = output
    last = Path(output) / CHECKPOINT_DIR / "last.json"
    if not args.resume:
        config, _ = build_config(preset, **given)
        if config.init_from and not Path(config.init_from).exists():
            raise ConfigError(
                f"--init-from: {config.init_from} does not exist (give a run folder, a "
                "model-zoo export folder or a checkpoint file)"
            )
        if last.is_file():
            raise ConfigError(
                f"{output} already holds a run (checkpoints/last.json); pass --resume to "
                "continue it, or choose another --output"
            )
        return config
    if not last.is_file():
        raise ConfigError(f"--resume: no checkpoint in {output} (expected {last})")
    saved = load_config(output)
    probe = dict(given)
    probe.setdefault("dataset", saved.dataset)
    candidate, specified = build_config(preset, **probe)
    if "dataset" not in given and not preset:
        specified.discard("dataset")
    check_resume(saved.to_dict(), candidate.to_dict(), only=specified)
    merged = saved.to_dict()
    merged.update({k: v for k, v in given.items() if k in runtime_fields(merged)})
    return TrainConfig.from_dict(merged).validate()


def _train_worker(config: Any, progress: bool, resume: bool) -> None:
    """One process of a ``--nproc`` run (started by ``paddle.distributed.spawn``)."""
    import os

    import paddle.distributed as dist

    # Own process group: a terminal's Ctrl-C reaches the parent only, which passes it on
    # once (a second SIGINT would mean "stop without saving").
    os.setpgrp()
    dist.init_parallel_env()
    code = _with_clear_errors("paddlefsl train", lambda: _run_training(config, progress, resume))
    # Only rank 0 reports an interruption through its exit code: spawn() terminates the
    # other processes as soon as one exits non-zero, and rank 0 may still be saving.
    if code and (dist.get_rank() == 0 or code < 128):
        raise SystemExit(code)


def _cmd_train(args: argparse.Namespace) -> int:
    config = _train_config(args)
    if config.nproc > 1:
        return _spawn_training(config, not args.no_progress, args.resume)
    return _run_training(config, not args.no_progress, args.resume)


def _spawn_training(config: Any, progress: bool, resume: bool) -> int:
    """Run ``config.nproc`` training processes; SIGINT / SIGTERM are passed on to them."""
    import os
    import signal

    import paddle.distributed as dist

    context = dist.spawn(
        _train_worker, args=(config, progress, resume), nprocs=config.nproc, join=False
    )

    def forward(signum: int, frame: Any) -> None:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not context.join():
            pass
    except Exception as error:  # noqa: BLE001  (a worker exited non-zero)
        codes = [p.exitcode for p in context.processes]
        # spawn() stops the other processes with SIGTERM once one has exited non-zero, so
        # a SIGTERM death is a consequence; any other signal (SIGKILL from the OOM killer,
        # SIGSEGV) is a cause, and the killed process had no chance to say so itself.
        killed = [(r, -c) for r, c in enumerate(codes) if c and c < 0 and -c != signal.SIGTERM]
        if killed:
            names = ", ".join(f"process {r} by {signal.Signals(n).name}" for r, n in killed)
            print(
                f"paddlefsl train: killed: {names}; the last checkpoint written is kept. "
                f"Continue with: paddlefsl train --resume --output {config.output}",
                file=sys.stderr,
            )
            return 1
        if codes[0] and codes[0] >= 128:
            return codes[0]  # rank 0 was interrupted and has saved
        failed = [code for code in codes if code]
        # The processes other than rank 0 report nothing themselves (one report per run):
        # what spawn() relays of the failure (a traceback for an unexpected error) is
        # the only account of it.
        print(
            f"paddlefsl train: a training process failed (exit codes {codes}): "
            f"{str(error).strip() or type(error).__name__}\nThe last checkpoint written is "
            f"kept. Continue with: paddlefsl train --resume --output {config.output}",
            file=sys.stderr,
        )
        return max(failed) if failed and all(code > 0 for code in failed) else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _run_training(config: Any, progress: bool, resume: bool) -> int:
    from .runtime import use_cores
    from .train.builders import build_trainer

    use_cores(config.nproc)  # oneDNN convolutions: this process's share of the cores
    trainer = build_trainer(config, progress=progress)
    # One report per run: the other processes of a --nproc run stay quiet.
    say = print if trainer.group.is_main else (lambda *args, **kwargs: None)
    if resume:
        start = trainer.resume()
        say(f"resuming {config.output} at iteration {start}", file=sys.stderr)
    elif config.init_from:
        start = trainer.warm_start(config.init_from)
        say(
            f"starting from the weights of {config.init_from} (iteration {start} of its run)",
            file=sys.stderr,
        )
    pool = f" (a pool of {config.task_pool} training tasks)" if config.task_pool else ""
    say(
        f"{config.algorithm} on {config.dataset}: {config.ways}-way {config.shots}-shot, "
        f"{config.iterations} iterations{pool} -> {config.output}",
        file=sys.stderr,
    )
    result = trainer.fit(config.iterations)
    if result.status == "interrupted":
        say(
            f"interrupted at iteration {result.iteration}; checkpoint saved. Continue with: "
            f"paddlefsl train --resume --output {config.output}"
        )
        return 128 + int(result.signal or 2)
    best = ""
    if result.best_metric is not None and trainer.objective is not None:
        best = (
            f"; best validation {trainer.objective.metric_name} "
            f"{result.best_metric:.4f} at iteration {result.best_iteration}"
        )
    say(
        f"done: {result.iteration} iterations{best}. Evaluate with: paddlefsl eval "
        f"--checkpoint {config.output}"
    )
    return 0


# ---------------------------------------------------------------------- eval
def _eval_options(args: argparse.Namespace) -> Any:
    from .train.scoring import EvalOptions

    return EvalOptions(
        split=args.split,
        eval_tasks=args.eval_tasks,
        inner_steps_test=args.inner_steps_test,
        data_root=args.data_root,
        by_step=args.by_step,
        progress=not args.no_progress,
    )


def _cmd_eval(args: argparse.Namespace) -> int:
    from .runtime import use_cores
    from .train.checkpoint import atomic_write_json, load_checkpoint
    from .train.errors import ConfigError
    from .train.metrics import plot_learning_curve
    from .train.scoring import eval_config, report_dir, score_checkpoint, task_fields
    from .train.status import kept_reports

    baseline = _read_eval_report(args.baseline, args.split) if args.baseline else None
    if args.follow and args.which != "kept":
        raise ConfigError("--follow goes with --which kept (it scores kept checkpoints)")
    use_cores(1)
    if args.which == "kept":
        return _eval_kept(args, baseline)
    ckpt = load_checkpoint(args.checkpoint, which=args.which)
    options = _eval_options(args)
    if baseline is not None:  # before scoring, which can take many minutes
        fields = task_fields(eval_config(ckpt, options), args.split)
        _check_pairable(baseline, ckpt.path, fields, _BASELINE_HINT)
    report = score_checkpoint(ckpt, options)
    out_dir = Path(args.output) if args.output else report_dir(ckpt)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / f"eval_{args.split}.json"
    atomic_write_json(out_file, report)
    metric, steps = report["metric"], report["inner_steps"]
    scale, unit = (100.0, "%") if metric == "accuracy" else (1.0, "")
    paper = report.get("paper")
    paper_text = f" (paper: {paper}{unit})" if paper else ""
    print(
        f"{args.split} {metric} {_score_text(report)} (95% CI, {report['num_tasks']} tasks, "
        f"{steps} inner steps, iteration {report['iteration']}){paper_text}; "
        f"written to {out_file}"
    )
    if not math.isfinite(report["mean"]):
        print(
            f"warning: the {metric} is not finite: the adapted models diverge with "
            f"{steps} inner steps; try fewer (--inner-steps-test, '--by-step' "
            "shows the metric after each step)",
            file=sys.stderr,
        )
    if report["by_step"]:
        by_step = ", ".join(
            f"{row['step']}: {scale * row['mean']:.2f} +- {scale * row['ci95']:.2f}"
            for row in report["by_step"]
        )
        print(f"{metric} by inner step{' (%)' if unit else ''}: {by_step}")
    if baseline is not None:
        print(_paired_text(baseline, report, f"{out_file}"))
    tests = kept_reports(ckpt.run_dir, args.split) if args.split == "test" else []
    curve = plot_learning_curve(ckpt.run_dir, out_dir / "learning_curve.png", tests)
    print(curve, file=sys.stderr)
    return 0


def _score_text(report: dict[str, Any]) -> str:
    """``99.59 +- 0.12%`` for accuracy, ``0.0123 +- 0.0045`` for MSE."""
    if report["metric"] == "accuracy":
        return f"{100 * report['mean']:.2f}% +- {100 * report['ci95']:.2f}%"
    return f"{report['mean']:.4g} +- {report['ci95']:.2g}"


#: How to mend an ``eval --baseline`` that scored other tasks.
_BASELINE_HINT = "give a --baseline evaluated with the same --split and --eval-tasks"


def _check_pairable(
    baseline: tuple[Path, dict[str, Any]], name: Any, report: dict[str, Any], hint: str
) -> None:
    """Refuse, with an error ending in ``hint``, a report of other tasks than ``baseline``'s.

    ``report`` is a finished report or just its task fields
    (:func:`paddlefsl.train.scoring.task_fields`), so the check can run before scoring.
    """
    from .train.errors import ConfigError
    from .train.evaluate import unpaired_fields

    base_path, base = baseline
    differing = unpaired_fields(base, report)
    count = len(report["values"]) if "values" in report else report["num_tasks"]
    if differing or len(base["values"]) != count:
        base_cfg, cand_cfg = base.get("config") or {}, report.get("config") or {}
        detail = ", ".join(
            f"{k} ({base.get(k, base_cfg.get(k))} vs {report.get(k, cand_cfg.get(k))})"
            for k in differing
        )
        raise ConfigError(
            f"{base_path} and {name} did not score the same tasks ({detail or 'task count'}); "
            + hint
        )


def _paired(
    baseline: tuple[Path, dict[str, Any]], name: Any, report: dict[str, Any], hint: str
) -> Any:
    """``report - baseline`` paired per task, a ``PairedDifference``.

    Reports of different tasks are refused with an error that ends in ``hint``.
    """
    from .train.evaluate import paired_difference

    _check_pairable(baseline, name, report, hint)
    higher_is_better = report["metric"] != "mse"
    return paired_difference(baseline[1]["values"], report["values"], higher_is_better)


def _paired_text(
    baseline: tuple[Path, dict[str, Any]], report: dict[str, Any], name: str, short: bool = False
) -> str:
    """``report - baseline`` as text, with its interval (and verdict unless ``short``)."""
    diff = _paired(baseline, name, report, _BASELINE_HINT)
    scale, unit = (100.0, " points") if report["metric"] == "accuracy" else (1.0, "")
    text = f"{scale * diff.mean:+.2f} +- {scale * diff.ci95:.2f}"
    if short:
        return text + ("" if diff.excludes_zero else " (0 inside)")
    low, high = (scale * bound for bound in diff.interval)
    verdict = "excludes 0" if diff.excludes_zero else "includes 0: no difference shown"
    return (
        f"paired against {baseline[0]}: {text}{unit} (better on {diff.better} tasks, worse "
        f"on {diff.worse}); the interval {_interval_text(low, high)} {verdict}"
    )


def _eval_kept(args: argparse.Namespace, baseline: tuple[Path, dict[str, Any]] | None) -> int:
    """``eval --which kept``: one line per kept checkpoint, scored or reused, oldest first."""
    import time

    from .train.checkpoint import CheckpointManager
    from .train.config import load_config
    from .train.errors import ConfigError
    from .train.metrics import plot_learning_curve
    from .train.scoring import eval_config, run_folder, score_kept, task_fields
    from .train.status import kept_reports, run_status

    options = _eval_options(args)
    run = run_folder(args.checkpoint)
    if baseline is not None:  # before scoring; each new kept report is checked again
        # The run's config stands for the checkpoints still to come; each kept record holds
        # the config it was trained with (a resume may have changed --eval-tasks).
        for source in (run, *CheckpointManager(run).kept()):
            fields = task_fields(eval_config(source, options), args.split)
            _check_pairable(baseline, source, fields, _BASELINE_HINT)
    shown: set[tuple[int, Any]] = set()
    counts = {"scored": 0, "reused": 0}
    waited_first = False

    def starting(iteration: int) -> None:
        if options.progress:
            print(f"scoring iteration {iteration} ...", file=sys.stderr, flush=True)

    while True:
        training = args.follow and run_status(run).state == "training"
        if training and not CheckpointManager(run).kept():
            if not load_config(run).keep_every:
                raise ConfigError(
                    f"{run} keeps no checkpoints (it trains with --keep-every 0); stop it and "
                    "resume it with --keep-every N to follow it"
                )
            if not waited_first:
                print(f"{run}: waiting for the first kept checkpoint", file=sys.stderr)
                waited_first = True
            time.sleep(30)
            continue
        for score in score_kept(run, options, output=args.output, on_start=starting):
            seen = (score.iteration, score.report.get("checkpoint_sha256"))
            if seen in shown:  # printed in an earlier pass (a rewritten one prints again)
                continue
            if not shown:
                report = score.report
                print(
                    f"{run}: kept checkpoints, {args.split} {report['metric']} "
                    f"({report['num_tasks']} tasks, {report['inner_steps']} inner steps)"
                    + (f"; paired against {baseline[0]}" if baseline else "")
                )
            shown.add(seen)
            counts["reused" if score.reused else "scored"] += 1
            paired = ""
            if baseline is not None:
                paired = "   " + _paired_text(baseline, score.report, str(score.path), True)
            print(f"  {score.iteration:>9,}  {_score_text(score.report)}{paired}", flush=True)
        if not training:
            break
        time.sleep(30)  # the run is still training: wait for its next kept checkpoint
    where = Path(args.output) if args.output else run
    if args.split == "test" and args.output is None:
        tests = kept_reports(run)
        print(plot_learning_curve(run, run / "learning_curve.png", tests), file=sys.stderr)
    print(
        f"{counts['scored']} scored, {counts['reused']} already scored (same model and "
        f"tasks); reports in {where}/kept-NNNNNNN/eval_{args.split}.json"
    )
    return 0


# ---------------------------------------------------------------------- compare
def _read_eval_report(path_text: str, split: str) -> tuple[Path, dict[str, Any]]:
    from .train.errors import ConfigError

    path = Path(path_text)
    if path.is_dir():
        path = path / f"eval_{split}.json"
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: give an eval_<split>.json written by 'paddlefsl eval' or "
            "the folder it was written to"
        )
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is not a readable JSON file ({err})") from err
    fields = ("values", "metric", "mean", "ci95")
    missing = [k for k in fields if k not in report] if isinstance(report, dict) else list(fields)
    if missing or not isinstance(report["values"], list):
        raise ConfigError(
            f"{path} lacks {', '.join(missing) or 'a list of per-task values'}; it was not "
            "written by 'paddlefsl eval'"
        )
    return path, report


def _interval_text(low: float, high: float) -> str:
    """``[low, high]`` with the fewest decimals (two to six) that keep each bound's sign.

    At two decimals, ``-0.14 +- 0.14`` could exclude 0 and look as if it touched it; the
    bounds are printed precisely enough to show which side of 0 they lie on.
    """
    for decimals in range(2, 7):
        if all(bound == 0 or round(bound, decimals) != 0 for bound in (low, high)):
            break
    return f"[{low:+.{decimals}f}, {high:+.{decimals}f}]"


def _cmd_compare(args: argparse.Namespace) -> int:
    base_path, base = _read_eval_report(args.baseline, args.split)
    cand_path, cand = _read_eval_report(args.candidate, args.split)
    hint = "evaluate both with the same --split and --eval-tasks on the same dataset setting"
    diff = _paired((base_path, base), cand_path, cand, hint)
    metric, split = base["metric"], base.get("split", args.split)  # a file names its own split
    scale, unit = (100.0, " points") if metric == "accuracy" else (1.0, "")
    low, high = (scale * bound for bound in diff.interval)
    verdict = f"the interval {_interval_text(low, high)} " + (
        "excludes 0" if diff.excludes_zero else "includes 0: no difference shown"
    )
    print(
        f"{split} {metric}, candidate - baseline: {scale * diff.mean:+.2f} +- "
        f"{scale * diff.ci95:.2f}{unit} (95% CI, paired over {diff.num_tasks} tasks; candidate "
        f"better on {diff.better}, worse on {diff.worse}, equal on {diff.ties}); {verdict}"
    )
    for name, report in (("baseline", base), ("candidate", cand)):
        print(
            f"  {name}: {scale * report['mean']:.2f} +- {scale * report['ci95']:.2f} "
            f"(iteration {report.get('iteration')}, {report.get('checkpoint')})"
        )
    return 0


# ---------------------------------------------------------------------- status
def _cmd_status(args: argparse.Namespace) -> int:
    from .train.status import find_runs, format_status, run_status

    # a folder of runs stands for the runs in it; any bad folder stops before any output
    statuses = [run_status(run) for folder in args.runs for run in find_runs(folder)]
    for status in statuses:
        print(json.dumps(status.to_dict()) if args.json else format_status(status))
    return 0


# ---------------------------------------------------------------------- export
def _size(num_bytes: int) -> str:
    if num_bytes < 1000:
        return f"{num_bytes} B"
    if num_bytes < 1_000_000:
        return f"{num_bytes / 1e3:.1f} kB"
    return f"{num_bytes / 1e6:.1f} MB"


def _cmd_export(args: argparse.Namespace) -> int:
    import json

    from .train.checkpoint import export_checkpoint
    from .train.config import TrainConfig
    from .train.errors import ConfigError

    record_path = export_checkpoint(
        args.checkpoint, args.output, which=args.which, overwrite=args.force
    )
    record = json.loads(record_path.read_text())
    folder = record_path.parent
    written = [
        f"{name} ({_size((folder / name).stat().st_size)})"
        for name in (record["files"]["model"], "metrics.jsonl", record_path.name)
        if (folder / name).is_file()
    ]
    print(
        f"exported iteration {record['iteration']} of {record['exported_from']['record']} "
        f"to {folder}: {', '.join(written)}"
    )
    saved = record.get("config") or {}
    try:
        dataset = TrainConfig.from_dict(saved).validate().dataset if saved else None
    except ConfigError:
        dataset = None
    if dataset is None:
        print(
            "its configuration is not that of a 'paddlefsl train' run, so 'paddlefsl eval' "
            "cannot rebuild the model; load it with paddlefsl.train.load_checkpoint"
        )
        return 0
    data_root = "" if dataset == "sinusoid" else " --data-root DIR"
    print(f"Evaluate with: paddlefsl eval --checkpoint {folder}{data_root}")
    return 0


# ---------------------------------------------------------------------- sinusoid
def _cmd_sinusoid(argv: list[str]) -> int:
    try:
        demo = importlib.import_module("paddlefsl.demos.sinusoid")
    except ModuleNotFoundError as err:
        if err.name not in ("paddlefsl.demos", "paddlefsl.demos.sinusoid"):
            raise
        _fail(
            "paddlefsl sinusoid",
            "the sinusoid demo (paddlefsl.demos.sinusoid) is not part of this installation",
        )
    code = demo.main(argv)
    # The demo returns its results (a dict); only an int is an exit status.
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``paddlefsl`` command; returns the exit code (errors raise ``SystemExit``).

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).

    """
    argv = list(sys.argv[1:] if argv is None else argv)
    from .runtime import tune_allocator, unlock_mkl_on_amd

    tune_allocator()  # reuse freed activation memory: ~15-20% faster meta-iterations
    unlock_mkl_on_amd()  # before any matrix product: MKL reads it once
    if argv and argv[0] == "sinusoid":
        # Everything after the subcommand belongs to the demo, including --help.
        return _cmd_sinusoid(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("choose a command: train, eval, compare, status, export or sinusoid")
    prog = f"paddlefsl {args.command}"
    handler = {
        "train": _cmd_train,
        "eval": _cmd_eval,
        "compare": _cmd_compare,
        "status": _cmd_status,
        "export": _cmd_export,
    }[args.command]

    return _with_clear_errors(prog, lambda: handler(args))


def _with_clear_errors(prog: str, run: Any) -> int:
    """Run ``run()``; known failures become one line on stderr and an exit code."""
    from .data import CorruptDataError, TaskConfigError
    from .train.errors import CheckpointError, ConfigError, NonFiniteLossError, RunInUseError

    try:
        with warnings.catch_warnings():
            # Paddle repeats this notice for every BatchNorm in train mode; it is expected
            # here (MAML normalises with batch statistics) and would only clutter the output.
            warnings.filterwarnings("ignore", message="When training, we now always track")
            return run()
    except ConfigError as err:
        _fail(prog, err)
    except (TaskConfigError, CorruptDataError) as err:
        _fail(prog, f"{err} (see {DOCS}#data)")
    except FileNotFoundError as err:
        _fail(prog, f"{err} (see {DOCS}#data)")
    except (CheckpointError, RunInUseError) as err:
        _fail(prog, err)
    except NonFiniteLossError as err:
        _fail(prog, err, code=1)
    except KeyboardInterrupt:
        _fail(prog, "interrupted; the last checkpoint written is kept", code=130)
    except BrokenPipeError:
        # The reader went away (`paddlefsl status ... | head`): stop quietly, as the shell's
        # own tools do, instead of a traceback; later writes go nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None  # 128 + SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
