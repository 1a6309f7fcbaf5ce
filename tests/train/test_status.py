"""`paddlefsl status` / run_status: where a run stands, read from its folder only."""

import json
import os

import pytest
from train_helpers import SINUSOID_TRAIN, cli_error

from paddlefsl.cli import main
from paddlefsl.train import ConfigError, MetricsLog
from paddlefsl.train.runlock import RunLock
from paddlefsl.train.status import format_status, run_status


def _fake_run(run, rows, iteration=None, target=1000):
    log = MetricsLog(run)
    log.write({"iteration": 0, "event": "start", "target": target, "nproc": 1})
    for row in rows:
        log.write(row)
    if iteration is not None:
        (run / "checkpoints").mkdir()
        record = {
            "iteration": iteration,
            "saved_at": "2026-12-06T10:00:00+0000",
            "state": {"elapsed": 800.0, "best_iteration": 200, "best_metric": 0.95},
        }
        (run / "checkpoints" / "last.json").write_text(json.dumps(record))


def _train_rows(upto, step=100, rate=2.0):
    return [
        {"iteration": i, "split": "train", "loss": 0.1 * i / upto, "accuracy": 0.9,
         "iters_per_sec": rate, "elapsed": i / rate}
        for i in range(step, upto + 1, step)
    ]  # fmt: skip


def test_a_run_with_a_lock_holder_is_training_with_time_left(tmp_path):
    _fake_run(tmp_path, _train_rows(400) + [{"iteration": 400, "split": "val",
              "accuracy": 0.93, "ci95": 0.01, "loss": 0.2}], iteration=400)  # fmt: skip
    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        status = run_status(tmp_path, now=1796551800.0)  # 2026-12-06T10:10:00Z
    finally:
        lock.release()
    assert status.state == "training" and status.pid == os.getpid()
    assert status.logged_iteration == 400 and status.target == 1000
    assert status.seconds_left == pytest.approx(600 / 2.0)
    assert status.checkpoint_age == pytest.approx(600.0)
    # the last 10 rows of 4: their mean loss (0.025 + 0.05 + 0.075 + 0.1) / 4
    assert status.recent["rows"] == 4 and status.recent["loss"] == pytest.approx(0.0625)
    assert status.best == {"iteration": 200, "value": 0.95}
    text = format_status(status)
    assert f"training (pid {os.getpid()})" in text
    assert "iteration 400 of 1,000 (40%); 2.00 it/s, about 5 min to go" in text
    assert "validation at 400: accuracy 93.00 ± 1.00%; best 95.00% at 200" in text
    assert "last checkpoint at iteration 400, written 10 min ago" in text


def test_without_a_lock_holder_a_run_is_stopped_or_finished(tmp_path):
    stopped, finished = tmp_path / "stopped", tmp_path / "finished"
    _fake_run(stopped, _train_rows(300), iteration=200)
    _fake_run(finished, _train_rows(1000), iteration=1000)
    (stopped / ".lock").write_text("12345\n")  # left by an ended process: not held
    s = run_status(stopped)
    assert s.state == "stopped" and s.pid is None and s.seconds_left is None
    assert f"continue with: paddlefsl train --resume --output {stopped}" in format_status(s)
    assert run_status(finished).state == "finished"


def test_non_finite_stop_and_not_started(tmp_path):
    bad, new = tmp_path / "bad", tmp_path / "new"
    _fake_run(bad, _train_rows(200) + [{"iteration": 210, "event": "non_finite",
              "message": "loss is nan at iteration 210"}], iteration=200)  # fmt: skip
    s = run_status(bad)
    assert s.state == "non-finite" and "loss is nan at iteration 210" in format_status(s)
    _fake_run(new, [])
    assert format_status(run_status(new)) == f"{new}: not started (target 1,000 iterations)"


def test_status_writes_nothing(tmp_path):
    _fake_run(tmp_path, _train_rows(300), iteration=300)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    run_status(tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # no .lock made


def test_cli_status_of_a_real_run_and_json(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(SINUSOID_TRAIN + ["--output", str(run)]) == 0
    capsys.readouterr()
    assert main(["status", str(run)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{run}: finished\n  iteration 4 of 4 (100%)"), text
    assert "train (last" in text and "mse" in text
    assert main(["status", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["state"] == "finished" and data["iteration"] == 4 and data["metric"] == "mse"
    assert data["test"] is None and data["kept"] == []
    assert main(["eval", "--checkpoint", str(run), "--eval-tasks", "3", "--no-progress"]) == 0
    capsys.readouterr()
    report = json.loads((run / "eval_test.json").read_text())
    assert main(["status", str(run)]) == 0
    line = f"  test (3 tasks, eval_test.json): mse {report['mean']:.4g} ± {report['ci95']:.2g}"
    assert line + f" at iteration {report['iteration']:,}" in capsys.readouterr().out


def test_cli_status_of_a_folder_that_is_no_run(tmp_path, capsys):
    line = cli_error(capsys, ["status", str(tmp_path)])
    assert "is not a run folder" in line and "--output" in line
    with pytest.raises(ConfigError):
        run_status(tmp_path / "missing")


def test_training_before_its_first_log_row_reports_the_checkpoint(tmp_path):
    _fake_run(tmp_path, [], iteration=200)  # a resumed run that has not logged yet
    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        text = format_status(run_status(tmp_path))
    finally:
        lock.release()
    assert "training" in text and "iteration 200 of 1,000 (20%)" in text


def test_a_closed_pipe_ends_the_command_quietly():
    """`paddlefsl status ... | head`: exit 141 (128 + SIGPIPE), no traceback."""
    import subprocess
    import sys

    code = (
        "from paddlefsl.cli import _with_clear_errors\n"
        "def write():\n"
        "    raise BrokenPipeError(32, 'Broken pipe')\n"
        "_with_clear_errors('paddlefsl status', write)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 141 and "Traceback" not in done.stderr, done.stderr


def test_an_export_and_a_run_killed_before_its_first_checkpoint(tmp_path, capsys):
    run, export, early = tmp_path / "run", tmp_path / "export", tmp_path / "early"
    assert main(SINUSOID_TRAIN + ["--output", str(run)]) == 0
    assert main(["export", "--checkpoint", str(run), "--output", str(export)]) == 0
    capsys.readouterr()
    s = run_status(export)
    assert s.state == "exported" and s.iteration == 4
    assert "an export (weights only)" in format_status(s)
    _fake_run(early, _train_rows(300))  # metrics, but no checkpoint yet
    assert run_status(early).state == "stopped before its first checkpoint"


def test_a_folder_of_runs_stands_for_its_runs(tmp_path, capsys):
    _fake_run(tmp_path / "b" / "second", _train_rows(200), iteration=200)
    _fake_run(tmp_path / "a", _train_rows(1000), iteration=1000)
    (tmp_path / "a" / "evals" / "x").mkdir(parents=True)  # not searched: inside a run
    (tmp_path / "a" / "evals" / "x" / "metrics.jsonl").write_text("")
    (tmp_path / "empty").mkdir()
    assert main(["status", str(tmp_path)]) == 0
    heads = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    second = tmp_path / "b" / "second"
    resume = f"continue with: paddlefsl train --resume --output {second}"
    assert heads == [f"{tmp_path / 'a'}: finished", f"{second}: stopped; {resume}"]
    line = cli_error(capsys, ["status", str(tmp_path / "empty")])
    assert "holds none" in line


def test_status_counts_the_kept_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(SINUSOID_TRAIN + ["--output", str(run), "--keep-every", "2"]) == 0
    capsys.readouterr()
    assert run_status(run).kept == [2, 4]
    assert "; 2 kept (iterations 2-4);" in format_status(run_status(run))
    assert run_status(run).kept_test is None  # none scored yet

    # Scored kept checkpoints: the newest one's test result, and the best when it is not.
    argv = ["eval", "--checkpoint", str(run), "--which", "kept", "--eval-tasks", "3"]
    assert main(argv + ["--no-progress"]) == 0
    capsys.readouterr()
    reports = {i: run / f"kept-{i:07d}" / "eval_test.json" for i in (2, 4)}
    means = {i: json.loads(path.read_text())["mean"] for i, path in reports.items()}
    kept_test = run_status(run).kept_test
    assert kept_test["scored"] == 2 and kept_test["last"]["iteration"] == 4
    assert kept_test["best"]["mean"] == min(means.values())  # sinusoid: MSE, lower is better
    # make iteration 2 clearly the best, then only its result is removed
    better = dict(json.loads(reports[2].read_text()), mean=means[4] / 10)
    reports[2].write_text(json.dumps(better))
    line = next(x for x in format_status(run_status(run)).splitlines() if "kept checkpoints" in x)
    assert line.startswith("  test of kept checkpoints (2 of 2 scored, 3 tasks): mse ")
    assert line.endswith(" at 2") and f"{means[4]:.4g} ± " in line and "; best " in line
    reports[2].unlink()
    kept_test = run_status(run).kept_test
    assert kept_test["scored"] == 1 and kept_test["best"] is kept_test["last"]
