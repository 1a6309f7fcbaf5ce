"""--nproc: two paddle.distributed processes (gloo) give the one-process weights."""

import json
import subprocess
import sys

import numpy as np
import paddle
import pytest

from paddlefsl.train.distributed import Group


def _sinusoid_command(output, nproc, iterations, meta_batch, *extra):
    """``paddlefsl train`` on sinusoid tasks, logging every iteration, no validation."""
    return [
        sys.executable,
        "-m",
        "paddlefsl.cli",
        "train",
        "--dataset",
        "sinusoid",
        "--iterations",
        str(iterations),
        "--meta-batch-size",
        str(meta_batch),
        "--val-tasks",
        "0",
        "--no-progress",
        "--log-every",
        "1",
        "--output",
        str(output),
        "--nproc",
        str(nproc),
        *extra,
    ]


def _train(output, nproc):
    cmd = _sinusoid_command(output, nproc, 4, 4, "--algorithm", "maml")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    # the process count is recorded with each stretch of training (CPU-hours)
    assert [r["nproc"] for r in rows if r.get("event") == "start"] == [nproc]
    return paddle.load(str(output / "checkpoints" / "iter-0000004.pdparams")), losses


def test_two_processes_match_one(tmp_path):
    one, one_losses = _train(tmp_path / "one", 1)
    two, two_losses = _train(tmp_path / "two", 2)
    # Each task counted once: a process adapting every task would double the summed loss
    # (and Adam would hide a doubled gradient in the weights).
    assert len(one_losses) == 4
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
    assert one.keys() == two.keys()
    for name in one:
        np.testing.assert_allclose(
            two[name].numpy(), one[name].numpy(), rtol=1e-5, atol=1e-6, err_msg=name
        )
    # And training moved the weights at all (the comparison is not vacuous).
    assert not np.allclose(one["head.weight"].numpy(), 0.0)


def test_task_ownership_partitions_the_batch():
    groups = [Group(rank, 3) for rank in range(3)]
    owners = [[g.owns(t) for g in groups].count(True) for t in range(10)]
    assert owners == [1] * 10
    assert Group().owns(5) and Group().is_main
    assert Group().sum([1.0, 2.0]) == [1.0, 2.0]


@pytest.mark.parametrize("bad", [0, -1])
def test_nproc_must_be_positive(bad):
    from paddlefsl.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train", "--dataset", "sinusoid", "--nproc", str(bad), "--output", "/tmp/x"])
    assert info.value.code == 2


def test_sigint_to_the_parent_saves_and_stops_all_processes(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    cmd = _sinusoid_command(out, 2, 1000000, 2, "--checkpoint-every", "1000000")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:  # wait until training is under way
        if metrics.exists() and '"split": "train"' in metrics.read_text():
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "checkpoint saved" in stdout
    record = json.loads((out / "checkpoints" / "last.json").read_text())
    assert record["iteration"] > 0


def test_a_killed_process_is_named_and_the_checkpoint_kept(tmp_path):
    import time

    out = tmp_path / "run"
    cmd = _sinusoid_command(out, 2, 1000000, 2, "--checkpoint-every", "5")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = out / "checkpoints" / "last.json"
    deadline = time.time() + 120
    while time.time() < deadline and not last.exists():  # wait for a first checkpoint
        time.sleep(0.5)
    workers = subprocess.run(
        ["pgrep", "-P", str(proc.pid), "-f", "multiprocessing"], capture_output=True, text=True
    ).stdout.split()
    assert workers, "no worker processes found"
    # A worker killed outright (as the kernel's OOM killer would) cannot report itself.
    subprocess.run(["kill", "-KILL", workers[-1]], check=True)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "SIGKILL" in stderr and "--resume" in stderr, stderr[-2000:]
    assert json.loads(last.read_text())["iteration"] >= 5


def test_two_processes_share_validation(tmp_path):
    """Validation split over two processes reports what one process reports."""
    rows = {}
    for nproc in (1, 2):
        output = tmp_path / str(nproc)
        extra = ("--algorithm", "maml", "--val-tasks", "5", "--eval-every", "2")
        done = subprocess.run(
            _sinusoid_command(output, nproc, 4, 4, *extra),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        lines = (output / "metrics.jsonl").read_text().splitlines()
        rows[nproc] = [r for r in map(json.loads, lines) if r.get("split") == "val"]
    assert [r["iteration"] for r in rows[2]] == [2, 4] == [r["iteration"] for r in rows[1]]
    for one, two in zip(rows[1], rows[2]):
        assert two["tasks"] == one["tasks"] == 5
        np.testing.assert_allclose(
            [two["mse"], two["ci95"], two["loss"]],
            [one["mse"], one["ci95"], one["loss"]],
            rtol=1e-4,
        )
