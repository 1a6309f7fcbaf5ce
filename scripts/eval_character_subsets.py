r"""How much does an Omniglot test accuracy depend on which characters are tested?

The MAML reference code (cbfinn/maml) as released until its commit 617ba8a (2017-10-19,
"omniglot test and validation splits were swapped") evaluated ``--test_set=True`` on the
100 characters after its 1,100 training characters, the ones meant for validation, not
on the 423 after them. This script measures what a 100-character test split does to one
model's number: it draws random subsets of ``--characters`` characters from the test
split (each with its four rotations, as in training), samples ``--tasks`` tasks from each
subset and evaluates them exactly as ``paddlefsl eval`` does (same learner, same test
steps, transductive BatchNorm). The spread of the subset means is the spread a test split
of that size adds to the number, which the usual 600-task interval does not include.

``--subsets 0`` only re-evaluates the whole split with the evaluation seed, which must
reproduce the checkpoint's ``paddlefsl eval`` number exactly (a check of this script).

``--only FILE`` evaluates one chosen subset instead: the test characters listed in FILE
(``Alphabet/characterNN``, one per line; others are ignored), on ``--tasks`` tasks of a
fixed seed, so that two checkpoints scored with the same file are scored on the same
tasks. The output then holds the per-task values, which ``paddlefsl compare`` pairs. For
example, the test characters a model trained on against those it never saw.

Example:
    python scripts/eval_character_subsets.py zoo/maml-omniglot-5w5s --data-root DATA/omniglot \
        --subsets 40 --characters 100 --output spread.json

"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from paddlefsl.data import ClassDataset, FixedTasks, Task, TaskSampler
from paddlefsl.runtime import use_cores
from paddlefsl.train import load_checkpoint
from paddlefsl.train.builders import build_dataset, build_learner, build_tasks
from paddlefsl.train.checkpoint import checkpointed_layer
from paddlefsl.train.config import TrainConfig
from paddlefsl.train.evaluate import SAME_SETTING, evaluate


def character_of(class_name: str) -> str:
    """``'Alphabet/character07/rot090'`` -> ``'Alphabet/character07'``."""
    return class_name.rsplit("/", 1)[0] if "/rot" in class_name else class_name


def character_subset(dataset: ClassDataset, characters: set[str]) -> ClassDataset:
    """The examples of ``dataset`` whose class belongs to one of ``characters``."""
    names = dataset.class_names
    keep = [i for i, name in enumerate(names) if character_of(name) in characters]
    index = np.sort(np.concatenate([dataset.indices_of(dataset.classes[i]) for i in keep]))
    kept_names = [names[i] for i in keep]
    return ClassDataset(np.asarray(dataset.images[index]), dataset.labels[index], kept_names)


class DistinctCharacterTasks:
    """Tasks sampled as cbfinn/maml samples them.

    ``ways`` distinct characters, each at one random rotation, ``shots + queries`` of its
    20 drawings. paddlefsl's :class:`TaskSampler` treats the rotations as classes of their
    own, so one of its tasks can hold one character twice (12 of the 600 fixed test tasks
    do).
    """

    def __init__(
        self, dataset: ClassDataset, ways: int, shots: int, queries: int, seed: int
    ) -> None:
        self.dataset, self.ways, self.shots, self.queries, self.seed = (
            dataset,
            ways,
            shots,
            queries,
            seed,
        )
        rotations: dict[str, list[int]] = {}
        for c, name in zip(dataset.classes, dataset.class_names, strict=True):
            rotations.setdefault(character_of(name), []).append(int(c))
        self.rotations = [np.array(v) for _, v in sorted(rotations.items())]

    def sample(self, index: int) -> Task:
        rng = np.random.default_rng([self.seed, index])
        chosen = rng.choice(len(self.rotations), size=self.ways, replace=False)
        classes = np.array([rng.choice(self.rotations[c]) for c in chosen])
        n = self.shots + self.queries
        picks = np.stack(
            [rng.choice(self.dataset.indices_of(c), size=n, replace=False) for c in classes]
        )
        support, query = picks[:, : self.shots].reshape(-1), picks[:, self.shots :].reshape(-1)
        return Task(
            support_x=self.dataset.get_images(support),
            support_y=np.repeat(np.arange(self.ways), self.shots),
            query_x=self.dataset.get_images(query),
            query_y=np.repeat(np.arange(self.ways), self.queries),
            index=index,
            classes=classes,
        )


def read_characters(parser: argparse.ArgumentParser, path: str) -> set[str]:
    """The characters listed in ``path``, one per line (blank lines and ``#`` skipped)."""
    try:
        lines = open(path).read().splitlines()
    except OSError as error:
        parser.error(f"cannot read --only {path}: {error}")
    listed = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    if not listed:
        parser.error(f"--only {path} lists no characters")
    return listed


def evaluate_listed(args, config, ckpt, learner, listed: set[str], parser) -> int:
    """``--only``: score the listed test characters on fixed tasks; write per-task values."""
    dataset = build_dataset(config, "test")
    characters = {character_of(n) for n in dataset.class_names}
    chosen = listed & characters
    if len(chosen) < config.ways:
        parser.error(
            f"--only {args.only}: {len(chosen)} of its {len(listed)} characters are test "
            f"characters, fewer than the {config.ways} a task needs (names look like "
            f"{sorted(characters)[0]!r})"
        )
    subset = character_subset(dataset, chosen)
    make = DistinctCharacterTasks if args.sampling == "characters" else TaskSampler
    sampler = make(subset, config.ways, config.shots, config.queries, seed=ONLY_SEED)
    result = evaluate(learner, FixedTasks(sampler, args.tasks), config.inner_steps_test)
    print(
        f"{len(chosen)} of the {len(characters)} test characters ({len(listed) - len(chosen)} "
        f"listed ones are not test characters): {100 * result.mean:.2f} +- "
        f"{100 * result.ci95:.2f}% ({args.tasks} tasks, sampling {args.sampling})"
    )
    if args.output:
        report = {
            **result.to_dict(),
            "split": f"test characters of {args.only}",
            "task_seed": ONLY_SEED,
            "sampling": args.sampling,
            "characters": len(chosen),
            "checkpoint": str(ckpt.path),
            "iteration": ckpt.iteration,
            "config": {k: getattr(config, k) for k in SAME_SETTING},
        }
        with open(args.output, "w") as f:
            f.write(json.dumps(report, indent=1) + "\n")
    return 0


#: Task seed of ``--only`` (any fixed value: both checkpoints of a comparison use it).
ONLY_SEED = 20171019


def main(argv: list[str] | None = None) -> int:
    """Evaluate the checkpoint on random character subsets; print and save the spread."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a run folder or a zoo entry")
    parser.add_argument("--data-root", required=True, help="folder holding the Omniglot files")
    parser.add_argument("--which", default="best", help="best or last (run folders)")
    parser.add_argument("--subsets", type=int, default=40, help="random character subsets")
    parser.add_argument("--characters", type=int, default=100, help="characters per subset")
    parser.add_argument("--tasks", type=int, default=600, help="test tasks per subset")
    parser.add_argument(
        "--sampling",
        choices=["characters", "classes"],
        default="characters",
        help="characters: distinct characters, one random rotation each (cbfinn/maml); "
        "classes: paddlefsl's sampler (rotations are classes)",
    )
    parser.add_argument(
        "--only",
        metavar="FILE",
        help="evaluate only the test characters listed in FILE (one subset, fixed tasks)",
    )
    parser.add_argument("--cores", type=int, default=1)
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    use_cores(args.cores)
    listed = read_characters(parser, args.only) if args.only else None

    ckpt = load_checkpoint(args.checkpoint, which=args.which)
    values = TrainConfig.from_dict(ckpt.config).to_dict()
    values["data_root"] = args.data_root
    config = TrainConfig.from_dict(values).validate()
    if config.dataset != "omniglot":
        parser.error(f"the checkpoint was trained on {config.dataset}; this script is for Omniglot")
    learner = build_learner(config)
    ckpt.load_model(checkpointed_layer(learner))
    steps = config.inner_steps_test

    if listed is not None:
        return evaluate_listed(args, config, ckpt, learner, listed, parser)
    full = evaluate(learner, build_tasks(config, "test", num_tasks=args.tasks), steps)
    print(f"whole test split: {100 * full.mean:.2f} +- {100 * full.ci95:.2f}%", flush=True)
    if args.subsets == 0:
        return 0

    dataset = build_dataset(config, "test")
    characters = sorted({character_of(n) for n in dataset.class_names})
    if args.characters > len(characters):
        parser.error(f"--characters {args.characters} > {len(characters)} test characters")
    rows = []
    if args.characters == len(characters):
        args.subsets = 1  # every subset is the whole split; only the task draw differs
    for s in range(args.subsets):
        start = time.perf_counter()
        rng = np.random.default_rng([20171019, s])
        chosen = set(rng.choice(characters, size=args.characters, replace=False).tolist())
        subset = character_subset(dataset, chosen)
        make = DistinctCharacterTasks if args.sampling == "characters" else TaskSampler
        sampler = make(subset, config.ways, config.shots, config.queries, seed=s)
        result = evaluate(learner, FixedTasks(sampler, args.tasks), steps)
        rows.append({"subset": s, "mean": result.mean, "ci95": result.ci95})
        print(
            f"subset {s:3d}: {100 * result.mean:.2f} +- {100 * result.ci95:.2f}% "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    means = np.array([r["mean"] for r in rows])
    summary = {
        "checkpoint": str(ckpt.path),
        "whole_split": {"mean": full.mean, "ci95": full.ci95, "tasks": args.tasks},
        "sampling": args.sampling,
        "characters_per_subset": args.characters,
        "test_characters": len(characters),
        "tasks_per_subset": args.tasks,
        "subset_mean": float(means.mean()),
        "subset_sd": float(means.std(ddof=1)) if len(means) > 1 else 0.0,
        "subset_min": float(means.min()),
        "subset_max": float(means.max()),
        "subset_percentiles_5_50_95": [float(np.percentile(means, q)) for q in (5, 50, 95)],
        "subsets_at_or_above_99.85": int((means >= 0.9985).sum()),
        "subsets": rows,
    }
    text = json.dumps(summary, indent=1)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    print(
        f"{len(rows)} subsets of {args.characters} characters: mean {100 * means.mean():.2f}%, "
        f"SD {100 * summary['subset_sd']:.2f}, "
        f"range {100 * means.min():.2f}-{100 * means.max():.2f}, "
        f"{summary['subsets_at_or_above_99.85']} at or above 99.85%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
