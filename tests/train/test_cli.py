import json
import sys
import types

import numpy as np
import pytest
from train_helpers import SINUSOID_TRAIN, cli_error, count_binary_writes

from paddlefsl.cli import main

SINUSOID = SINUSOID_TRAIN


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--ways", "0"], "--ways must be an integer >= 1 (got 0)"),
        (["train", "--ways", "five"], "--ways: invalid int value"),
        (["train", "--preset", "maml-cifar-5w1s"], "unknown preset 'maml-cifar-5w1s'"),
        (["train", "--algorithm", "reptile"], "invalid choice: 'reptile'"),
        (["train", "--inner-lr", "-0.1", "--dataset", "sinusoid"], "--inner-lr must be positive"),
        (
            ["train", "--dataset", "sinusoid", "--task-pool", "-5"],
            "--task-pool must be an integer >= 0 (got -5)",
        ),
        (["train", "--dataset", "omniglot"], "--data-root is required"),
        (["train", "--dataset", "sinusoid", "--keep-every", "-2"], "--keep-every must be"),
        (["eval"], "--checkpoint"),
        ([], "choose a command"),
    ],
)
def test_bad_options_exit_2_with_one_line(capsys, tmp_path, argv, expected):
    argv = argv + (["--output", str(tmp_path / "run")] if argv[:1] == ["train"] else [])
    line = cli_error(capsys, argv)
    assert line.startswith("paddlefsl")
    assert expected.replace("must be positive", "must be a positive number") in line


def test_missing_data_says_what_is_expected(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    line = cli_error(
        capsys,
        [
            "train",
            "--dataset",
            "omniglot",
            "--data-root",
            str(missing),
            "--output",
            str(tmp_path / "run"),
        ],
    )
    assert "images_background.zip" in line and "docs/cli.md#data" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = cli_error(
        capsys,
        [
            "train",
            "--preset",
            "maml-miniimagenet-5w1s",
            "--data-root",
            str(empty),
            "--output",
            str(tmp_path / "run2"),
        ],
    )
    assert "not found" in line and "docs/cli.md#data" in line


def test_train_resume_eval_end_to_end(capsys, tmp_path):
    out = str(tmp_path / "run")
    assert main(SINUSOID + ["--output", out]) == 0
    assert "done: 4 iterations" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["iterations"] == 4

    # Same folder again without --resume: refused, the run is kept.
    line = cli_error(capsys, SINUSOID + ["--output", out])
    assert "--resume" in line

    # Resuming with a different weight-changing option names the fields.
    line = cli_error(
        capsys, ["train", "--resume", "--output", out, "--inner-lr", "0.1", "--seed", "4"]
    )
    assert "inner_lr (saved 0.01, given 0.1)" in line and "seed" in line

    # Extending the run needs only the folder and the new length.
    assert main(["train", "--resume", "--output", out, "--iterations", "6", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "resuming" in captured.err and "done: 6 iterations" in captured.out

    assert (
        main(["eval", "--checkpoint", out, "--which", "last", "--eval-tasks", "5", "--no-progress"])
        == 0
    )
    captured = capsys.readouterr()
    assert "test mse" in captured.out and "95% CI, 5 tasks" in captured.out
    report = json.loads((tmp_path / "run" / "eval_test.json").read_text())
    assert report["iteration"] == 6 and report["num_tasks"] == 5
    assert report["metric"] == "mse" and len(report["values"]) == 5
    assert report["ci95"] >= 0 and report["config"]["dataset"] == "sinusoid"
    assert report["by_step"] == []

    argv = ["eval", "--checkpoint", out, "--eval-tasks", "5", "--no-progress", "--by-step"]
    assert main(argv + ["--inner-steps-test", "2", "--output", str(tmp_path / "ev")]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("mse by inner step: 0: ") and ", 2: " in line and ", 3: " not in line
    stepped = json.loads((tmp_path / "ev" / "eval_test.json").read_text())
    assert [row["step"] for row in stepped["by_step"]] == [0, 1, 2]
    assert stepped["by_step"][-1]["mean"] == pytest.approx(stepped["mean"], abs=1e-12)


def test_kept_checkpoints_are_evaluated_into_folders_of_their_own(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(SINUSOID + ["--output", str(run), "--keep-every", "2"]) == 0
    kept = sorted(p.name for p in (run / "checkpoints").glob("kept-*.json"))
    assert kept == ["kept-0000002.json", "kept-0000004.json"]
    # keep_every never changes the weights, so a resume may change it
    argv = ["train", "--resume", "--output", str(run), "--iterations", "6", "--keep-every", "3"]
    assert main(argv + ["--no-progress"]) == 0
    kept = sorted(p.name for p in (run / "checkpoints").glob("kept-*.json"))
    assert kept == ["kept-0000002.json", "kept-0000004.json", "kept-0000006.json"]
    capsys.readouterr()

    record = run / "checkpoints" / "kept-0000002.json"
    assert main(["eval", "--checkpoint", str(record), "--eval-tasks", "3", "--no-progress"]) == 0
    assert "iteration 2" in capsys.readouterr().out
    report = json.loads((run / "kept-0000002" / "eval_test.json").read_text())
    assert report["iteration"] == 2 and report["checkpoint_tag"] == "kept-0000002"
    assert not (run / "eval_test.json").exists()  # the run's own result is not overwritten


def _kept_rows(out):
    """``{iteration: line}`` of the table 'eval --which kept' prints."""
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    return {int(row[0].replace(",", "")): " ".join(row[1:]) for row in rows}


def test_eval_which_kept_scores_each_kept_checkpoint_once(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(SINUSOID + ["--output", str(run), "--keep-every", "2"]) == 0
    capsys.readouterr()
    kept = ["eval", "--checkpoint", str(run), "--which", "kept", "--eval-tasks", "3"]
    assert main(kept + ["--no-progress"]) == 0
    out = capsys.readouterr().out
    assert sorted(_kept_rows(out)) == [2, 4]
    assert "2 scored, 0 already scored" in out and "(3 tasks, 10 inner steps)" in out

    # One learner serves every checkpoint: each report equals scoring that record alone.
    for iteration in (2, 4):
        report = json.loads((run / f"kept-{iteration:07d}" / "eval_test.json").read_text())
        record = run / "checkpoints" / f"kept-{iteration:07d}.json"
        alone = tmp_path / f"alone-{iteration}"
        argv = ["eval", "--checkpoint", str(record), "--eval-tasks", "3", "--no-progress"]
        assert main(argv + ["--output", str(alone)]) == 0
        single = json.loads((alone / "eval_test.json").read_text())
        assert report["values"] == single["values"] and report["iteration"] == iteration
        assert report["checkpoint_sha256"] == json.loads(record.read_text())["sha256"]["model"]
    first, second = (
        json.loads((run / f"kept-{i:07d}" / "eval_test.json").read_text())["values"] for i in (2, 4)
    )
    assert first != second  # two different models, so reuse of the learner could show
    capsys.readouterr()

    # Again: nothing to score. After a resume only the new checkpoint is scored, and a
    # report that no longer matches its model (here: edited) is scored again.
    assert main(kept + ["--no-progress"]) == 0
    assert "0 scored, 2 already scored" in capsys.readouterr().out
    argv = ["train", "--resume", "--output", str(run), "--iterations", "6", "--no-progress"]
    assert main(argv) == 0
    path = run / "kept-0000002" / "eval_test.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), checkpoint_sha256="0")))
    capsys.readouterr()
    assert main(kept + ["--no-progress"]) == 0
    out = capsys.readouterr().out
    assert sorted(_kept_rows(out)) == [2, 4, 6] and "2 scored, 1 already scored" in out
    # Other tasks (here fewer) are another evaluation: everything is scored again.
    assert main(kept[:-1] + ["2", "--no-progress", "--output", str(tmp_path / "two")]) == 0
    assert "3 scored, 0 already scored" in capsys.readouterr().out
    assert (tmp_path / "two" / "kept-0000006" / "eval_test.json").is_file()


def test_eval_draws_the_kept_checkpoints_test_results(capsys, tmp_path, monkeypatch):
    import paddlefsl.train.metrics as metrics

    drawn = []
    monkeypatch.setattr(
        metrics, "plot_learning_curve", lambda run, png, tests=(): drawn.append((png, tests))
    )
    run = tmp_path / "run"
    assert main(SINUSOID + ["--output", str(run), "--keep-every", "2"]) == 0
    kept = ["eval", "--checkpoint", str(run), "--which", "kept", "--eval-tasks", "3"]
    assert main(kept + ["--no-progress"]) == 0
    png, tests = drawn[-1]
    assert png == run / "learning_curve.png" and [t["iteration"] for t in tests] == [2, 4]
    # a single evaluation draws them too; of the validation split, there are none
    assert main(["eval", "--checkpoint", str(run), "--eval-tasks", "3", "--no-progress"]) == 0
    assert [t["iteration"] for t in drawn[-1][1]] == [2, 4]
    argv = ["eval", "--checkpoint", str(run), "--split", "val", "--eval-tasks", "3"]
    assert main(argv + ["--no-progress"]) == 0
    assert drawn[-1][1] == []


def test_eval_refuses_a_baseline_of_other_tasks_before_scoring(capsys, tmp_path, monkeypatch):
    import paddlefsl.train.scoring as scoring

    run = tmp_path / "run"
    assert main(SINUSOID + ["--output", str(run), "--keep-every", "2"]) == 0
    assert main(["eval", "--checkpoint", str(run), "--eval-tasks", "3", "--no-progress"]) == 0
    base = run / "eval_test.json"
    capsys.readouterr()
    scored = []
    monkeypatch.setattr(scoring, "evaluate", lambda *a, **k: scored.append(a) or 1 / 0)
    out = tmp_path / "out"
    single = ["eval", "--checkpoint", str(run), "--eval-tasks", "4", "--output", str(out)]
    line = cli_error(capsys, single + ["--baseline", str(base), "--no-progress"])
    assert "did not score the same tasks" in line and "num_tasks (3 vs 4)" in line
    other_split = single[:3] + ["--eval-tasks", "3", "--split", "val", "--no-progress"]
    line = cli_error(capsys, other_split + ["--baseline", str(base)])
    assert "split (test vs val)" in line and "task_seed" in line
    kept = ["eval", "--checkpoint", str(run), "--which", "kept", "--eval-tasks", "4"]
    line = cli_error(capsys, kept + ["--baseline", str(base), "--no-progress"])
    assert "did not score the same tasks" in line and "num_tasks (3 vs 4)" in line
    assert scored == [] and not out.exists() and not (run / "kept-0000002").exists()


def test_training_writes_each_checkpoint_file_once(tmp_path, monkeypatch):
    writes = count_binary_writes(monkeypatch)
    # Every second iteration is validated, saved as last and kept: one write per file.
    assert main(SINUSOID + ["--output", str(tmp_path / "run"), "--keep-every", "2"]) == 0
    assert sorted(writes) == [
        f"iter-000000{i}.{ext}" for i in (2, 4) for ext in ("pdopt", "pdparams")
    ]
    records = ["best.json", "kept-0000002.json", "kept-0000004.json", "last.json"]
    on_disk = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert on_disk == sorted(records + writes)


def test_eval_which_kept_checks_every_kept_record_before_scoring(capsys, tmp_path, monkeypatch):
    import paddlefsl.train.scoring as scoring

    run = tmp_path / "run"
    first = SINUSOID + ["--output", str(run), "--keep-every", "2", "--eval-tasks", "3"]
    assert main(first) == 0
    # The resume changes --eval-tasks: kept-0000006 (and the run's config) say 5 tasks,
    # kept-0000002 and kept-0000004 still say 3.
    resume = ["train", "--resume", "--output", str(run), "--iterations", "6"]
    assert main(resume + ["--eval-tasks", "5", "--no-progress"]) == 0
    assert main(["eval", "--checkpoint", str(run), "--no-progress"]) == 0
    base = run / "eval_test.json"
    assert json.loads(base.read_text())["num_tasks"] == 5
    capsys.readouterr()
    scored = []
    monkeypatch.setattr(scoring, "evaluate", lambda *a, **k: scored.append(a) or 1 / 0)
    kept = ["eval", "--checkpoint", str(run), "--which", "kept", "--baseline", str(base)]
    line = cli_error(capsys, kept + ["--no-progress"])
    assert "kept-0000002.json did not score the same tasks" in line
    assert "num_tasks (5 vs 3)" in line
    assert scored == [] and not (run / "kept-0000002").exists()
    monkeypatch.undo()
    # With --eval-tasks every kept checkpoint scores the baseline's tasks.
    assert main(kept + ["--eval-tasks", "5", "--no-progress"]) == 0
    assert sorted(_kept_rows(capsys.readouterr().out)) == [2, 4, 6]


def test_eval_which_kept_pairs_with_a_baseline_and_names_bad_input(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(SINUSOID + ["--output", str(run), "--keep-every", "2"]) == 0
    kept = ["eval", "--checkpoint", str(run), "--which", "kept", "--eval-tasks", "3"]
    base = run / "kept-0000002"
    assert main(kept + ["--no-progress"]) == 0
    capsys.readouterr()
    assert main(kept + ["--no-progress", "--baseline", str(base)]) == 0
    rows = _kept_rows(capsys.readouterr().out)
    assert rows[2].endswith("+0.00 +- 0.00 (0 inside)")  # itself
    assert "+- " in rows[4].split("   ")[-1]

    # a single evaluation prints the whole comparison, as 'paddlefsl compare' would
    record = str(run / "checkpoints" / "kept-0000004.json")
    argv = ["eval", "--checkpoint", record, "--eval-tasks", "3", "--baseline", str(base)]
    assert main(argv + ["--no-progress"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith(f"paired against {base / 'eval_test.json'}: ")
    assert "better on" in line and "the interval [" in line

    line = cli_error(capsys, kept[:-1] + ["4", "--baseline", str(base), "--no-progress"])
    assert "did not score the same tasks" in line and "num_tasks (3 vs 4)" in line
    line = cli_error(capsys, ["eval", "--checkpoint", str(run), "--follow"])
    assert "--follow goes with --which kept" in line
    plain = tmp_path / "plain"
    assert main(SINUSOID + ["--output", str(plain)]) == 0
    capsys.readouterr()
    line = cli_error(capsys, ["eval", "--checkpoint", str(plain), "--which", "kept"])
    assert "has no kept checkpoints" in line and "--keep-every N" in line
    record = str(run / "checkpoints" / "kept-0000002.json")
    line = cli_error(capsys, ["eval", "--checkpoint", record, "--which", "kept"])
    assert "is a file" in line and "run folder" in line
    line = cli_error(capsys, ["eval", "--checkpoint", str(tmp_path / "nope"), "--which", "kept"])
    assert "does not exist" in line
    line = cli_error(capsys, ["export", "--checkpoint", str(run), "--which", "kept"])
    assert "invalid choice: 'kept'" in line


def test_eval_which_kept_follows_a_run_until_it_stops(capsys, tmp_path, monkeypatch):
    import time

    from paddlefsl.train.runlock import RunLock

    run = tmp_path / "run"
    assert main(SINUSOID + ["--output", str(run), "--keep-every", "2"]) == 0
    lock = RunLock(run)
    lock.acquire()  # the run looks as if it were still training
    waits = []

    def training_goes_on(seconds):
        # while 'eval --follow' waits, the run trains two more kept iterations and stops
        waits.append(seconds)
        lock.release()
        argv = ["train", "--resume", "--output", str(run), "--iterations", "6"]
        assert main(argv + ["--no-progress"]) == 0

    monkeypatch.setattr(time, "sleep", training_goes_on)
    capsys.readouterr()
    argv = ["eval", "--checkpoint", str(run), "--which", "kept", "--eval-tasks", "3"]
    assert main(argv + ["--follow", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert len(waits) == 1 and sorted(_kept_rows(out)) == [2, 4, 6]
    assert "3 scored, 0 already scored" in out

    # A run that has kept nothing yet is waited for; one that keeps nothing is an error.
    late = tmp_path / "late"
    assert main(SINUSOID + ["--output", str(late), "--keep-every", "6"]) == 0
    assert not list((late / "checkpoints").glob("kept-*"))
    lock = RunLock(late)
    lock.acquire()
    run = late  # training_goes_on now resumes this run (and releases its lock)
    waits.clear()
    capsys.readouterr()
    argv[2] = str(late)
    assert main(argv + ["--follow", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "waiting for the first kept checkpoint" in captured.err
    assert len(waits) == 1 and sorted(_kept_rows(captured.out)) == [6]
    plain = tmp_path / "plain"
    assert main(SINUSOID + ["--output", str(plain)]) == 0
    lock = RunLock(plain)
    lock.acquire()
    capsys.readouterr()
    line = cli_error(capsys, ["eval", "--checkpoint", str(plain), "--which", "kept", "--follow"])
    assert "keeps no checkpoints" in line and "resume it with --keep-every N" in line
    lock.release()


def _eval_report(path, values, **changes):
    report = {
        "split": "test",
        "task_seed": 7,
        "num_tasks": len(values),
        "metric": "accuracy",
        "mean": sum(values) / len(values),
        "ci95": 0.01,
        "iteration": 5,
        "checkpoint": "ckpt",
        "config": {"dataset": "omniglot", "ways": 5, "shots": 5, "queries": 5},
        "values": values,
    }
    report.update(changes)
    path.mkdir(parents=True, exist_ok=True)
    (path / "eval_test.json").write_text(json.dumps(report))
    return path


def test_compare_pairs_two_evaluations(capsys, tmp_path):
    base = _eval_report(tmp_path / "a", [1.0, 0.96, 0.92, 1.0, 0.88])
    cand = _eval_report(tmp_path / "b", [1.0, 1.0, 0.92, 0.96, 1.0])
    assert main(["compare", str(base), str(cand / "eval_test.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("test accuracy, candidate - baseline: +2.40 +- ")
    assert "better on 2, worse on 1, equal on 2" in out[0] and "includes 0" in out[0]
    assert "the interval [-" in out[0]
    assert out[1].startswith("  baseline: 95.20 +- 1.00 (iteration 5")

    # A gain whose interval ends just above 0: the bounds get the decimals that show it.
    near = _eval_report(tmp_path / "n", [0.9] * 300 + [0.8] * 300)
    gain = _eval_report(tmp_path / "g", [0.9] * 300 + [0.8] * 296 + [0.9] * 4)
    assert main(["compare", str(near), str(gain)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("test accuracy, candidate - baseline: +0.07 +- 0.07 points")
    assert "the interval [+0.002, +0.132] excludes 0" in line

    other = _eval_report(tmp_path / "c", [1.0] * 5, task_seed=8)
    line = cli_error(capsys, ["compare", str(base), str(other)])
    assert "did not score the same tasks (task_seed (7 vs 8))" in line
    shots = _eval_report(
        tmp_path / "d",
        [1.0] * 5,
        config={"dataset": "omniglot", "ways": 5, "shots": 1, "queries": 5},
    )
    assert "shots (5 vs 1)" in cli_error(capsys, ["compare", str(base), str(shots)])
    line = cli_error(capsys, ["compare", str(base), str(tmp_path / "missing")])
    assert "missing not found: give an eval_<split>.json" in line
    (tmp_path / "bad.json").write_text("{")
    line = cli_error(capsys, ["compare", str(base), str(tmp_path / "bad.json")])
    assert "not a readable JSON file" in line


def test_cosine_schedule_resumes_only_to_its_own_end(capsys, tmp_path):
    from paddlefsl.train import read_metrics
    from paddlefsl.train.checkpoint import load_checkpoint

    out = str(tmp_path / "run")
    assert (
        main(SINUSOID + ["--output", out, "--meta-lr-schedule", "cosine", "--log-every", "1"]) == 0
    )
    capsys.readouterr()
    state = load_checkpoint(out, which="last").optimizer_state["LR_Scheduler"]
    assert state["last_epoch"] == 4 and state["last_lr"] == pytest.approx(0.0, abs=1e-12)
    rates = [r["meta_lr"] for r in read_metrics(out) if r.get("split") == "train"]
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == len(rates) > 1
    # The schedule ends at --iterations: extending the run would change every later rate.
    line = cli_error(capsys, ["train", "--resume", "--output", out, "--iterations", "6"])
    assert "iterations (saved 4, given 6)" in line
    assert main(["train", "--resume", "--output", out, "--no-progress"]) == 0
    assert "done: 4 iterations" in capsys.readouterr().out


def test_resume_while_another_process_trains_there(capsys, tmp_path):
    from paddlefsl.train.runlock import RunLock

    out = str(tmp_path / "run")
    assert main(SINUSOID + ["--output", out]) == 0
    capsys.readouterr()
    lock = RunLock(out)
    lock.acquire()
    try:
        line = cli_error(capsys, ["train", "--resume", "--output", out, "--iterations", "6"])
    finally:
        lock.release()
    assert "in use by another training process" in line and "then resume" in line


def test_eval_bad_checkpoint(capsys, tmp_path):
    line = cli_error(capsys, ["eval", "--checkpoint", str(tmp_path)])
    assert "no checkpoint found" in line


def test_sinusoid_subcommand_forwards_argv(monkeypatch):
    calls = []
    demo = types.ModuleType("paddlefsl.demos.sinusoid")
    demo.main = lambda argv: calls.append(argv) or {"maml": {}}
    monkeypatch.setitem(sys.modules, "paddlefsl.demos.sinusoid", demo)
    assert main(["sinusoid", "--iterations", "7", "--help"]) == 0
    assert calls == [["--iterations", "7", "--help"]]


def test_a_failed_training_process_is_reported(capsys, monkeypatch, tmp_path):
    """--nproc: a worker's unexpected error reaches the user (the others stay quiet)."""
    import paddle.distributed as dist

    from paddlefsl import cli

    class Process:
        def __init__(self, code):
            self.exitcode, self.pid = code, 0

        def is_alive(self):
            return False

    class Context:
        processes = [Process(-15), Process(1)]  # rank 1 failed; spawn stopped rank 0

        def join(self):
            raise RuntimeError("Process 1 terminated with the following error:\nboom: gloo")

    monkeypatch.setattr(dist, "spawn", lambda *args, **kwargs: Context())
    config = types.SimpleNamespace(nproc=2, output=str(tmp_path / "run"))
    assert cli._spawn_training(config, False, False) == 1
    err = capsys.readouterr().err
    assert "a training process failed (exit codes [-15, 1])" in err
    assert "boom: gloo" in err
    assert f"paddlefsl train --resume --output {tmp_path / 'run'}" in err


def test_init_from_starts_a_new_run_from_saved_weights(capsys, tmp_path):
    from paddlefsl.train.checkpoint import load_checkpoint

    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    assert main(SINUSOID + ["--output", first]) == 0
    capsys.readouterr()
    source = load_checkpoint(first, which="best")

    # Zero iterations more: the new run's only checkpoint holds exactly the source weights.
    argv = SINUSOID + ["--output", second, "--init-from", first, "--seed", "1"]
    argv[argv.index("--iterations") + 1] = "1"
    assert main(argv) == 0
    assert "starting from the weights of" in capsys.readouterr().err
    events = [
        json.loads(line)
        for line in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()
    ]
    warm = [e for e in events if e.get("event") == "warm_start"]
    assert len(warm) == 1 and warm[0]["from_iteration"] == source.iteration
    assert warm[0]["sha256"] == source.record["sha256"]["model"]
    saved = json.loads((tmp_path / "second" / "config.json").read_text())
    assert saved["init_from"] == first and saved["seed"] == 1

    # One step of Adam from the source weights moves each weight by at most ~meta_lr.
    after = load_checkpoint(second, which="last")
    assert after.iteration == 1
    for name, value in source.model_state.items():
        moved = abs(after.model_state[name].numpy() - value.numpy()).max()
        assert 0 < moved <= 1.01e-3, (name, moved)


def test_init_from_errors_name_the_problem(capsys, tmp_path):
    first = str(tmp_path / "first")
    assert main(SINUSOID + ["--output", first]) == 0
    capsys.readouterr()
    line = cli_error(
        capsys,
        SINUSOID + ["--output", str(tmp_path / "a"), "--init-from", str(tmp_path / "missing")],
    )
    assert "--init-from" in line and "does not exist" in line
    wider = SINUSOID + ["--output", str(tmp_path / "b"), "--init-from", first]
    wider[wider.index("--hidden") + 1] = "16"
    line = cli_error(capsys, wider)
    assert "hidden (saved 8, given 16)" in line and "cannot start from" in line


def test_metasgd_trains_resumes_evaluates_and_exports(capsys, tmp_path):
    """The learned learning rates travel with the checkpoints, the export and the eval."""
    from paddlefsl.train import load_checkpoint

    run, out = tmp_path / "run", tmp_path / "export"
    argv = SINUSOID + ["--algorithm", "metasgd", "--output", str(run)]
    assert main(argv) == 0
    assert (
        main(["train", "--resume", "--output", str(run), "--iterations", "6", "--no-progress"]) == 0
    )
    saved = load_checkpoint(run, which="last")
    rates = {k: v.numpy() for k, v in saved.model_state.items() if k.startswith("lrs.")}
    assert rates and not all(np.allclose(r, 0.01) for r in rates.values())  # they trained
    assert main(["export", "--checkpoint", str(run), "--which", "last", "--output", str(out)]) == 0
    evaluate = ["--eval-tasks", "5", "--no-progress"]
    assert main(["eval", "--checkpoint", str(run), "--which", "last", *evaluate]) == 0
    assert main(["eval", "--checkpoint", str(out), *evaluate]) == 0
    capsys.readouterr()
    original = json.loads((run / "eval_test.json").read_text())
    exported = json.loads((out / "eval_test.json").read_text())
    assert exported["values"] == original["values"] and original["config"]["algorithm"] == "metasgd"


def test_eval_warns_when_the_adapted_models_diverge(capsys, tmp_path, monkeypatch):
    import paddlefsl.train.scoring as scoring  # where 'paddlefsl eval' calls evaluate
    from paddlefsl.train import EvalResult

    run = str(tmp_path / "run")
    assert main(SINUSOID + ["--output", run]) == 0
    nan = float("nan")

    def diverged(learner, tasks, inner_steps, task_type=None, **kwargs):
        return EvalResult("mse", nan, nan, nan, 2, nan, inner_steps, [nan, nan])

    monkeypatch.setattr(scoring, "evaluate", diverged)
    assert main(["eval", "--checkpoint", run, "--eval-tasks", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: the mse is not finite" in err and "--inner-steps-test" in err


def test_data_and_network_flags_reach_the_config(tmp_path):
    from paddlefsl.cli import _train_config, build_parser

    def config(*extra):
        argv = ["train", "--preset", "maml-omniglot-5w1s", *extra]
        argv += ["--data-root", str(tmp_path), "--output", str(tmp_path / "r")]
        return _train_config(build_parser().parse_args(argv))

    assert config("--omniglot-antialias").omniglot_antialias is True
    assert config().omniglot_antialias is False
    assert config("--task-pool", "200000").task_pool == 200000
    assert config("--conv-padding", "same").conv_padding == "same"
    assert config("--omniglot-rotations", "per-task").omniglot_rotations == "per-task"
    assert config().omniglot_rotations == "classes"
    assert config().conv_padding == "symmetric"
    assert config().task_pool is None


def test_eval_config_reads_a_run_a_record_or_a_checkpoint_alike(tmp_path):
    from paddlefsl.train import ConfigError, EvalOptions, eval_config, load_checkpoint

    run = tmp_path / "run"
    assert main(SINUSOID + ["--output", str(run), "--eval-tasks", "3"]) == 0
    record = run / "checkpoints" / "last.json"
    options = EvalOptions(inner_steps_test=4)
    configs = [eval_config(s, options) for s in (run, record, load_checkpoint(record))]
    assert [(c.eval_tasks, c.inner_steps_test, c.dataset) for c in configs] == [
        (3, 4, "sinusoid")
    ] * 3
    assert eval_config(str(record), EvalOptions(eval_tasks=7)).eval_tasks == 7
    for text in ("[1, 2]", "{}"):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ConfigError, match="has no saved configuration"):
            eval_config(bad, options)
