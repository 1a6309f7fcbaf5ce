"""The team scripts under scripts/ that summarise and drive the long runs."""

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _runs_report():
    spec = importlib.util.spec_from_file_location("runs_report", ROOT / "scripts/runs_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_run(folder: Path, iteration: int, metrics: list[dict], nproc: int = 2) -> None:
    (folder / "checkpoints").mkdir(parents=True)
    record = {"iteration": iteration, "config": {"nproc": nproc}, "state": {"elapsed": 7200.0}}
    (folder / "checkpoints" / "last.json").write_text(json.dumps(record))
    lines = [json.dumps(m) for m in metrics] + ['{"cut by a kill']  # a torn last line
    (folder / "metrics.jsonl").write_text("\n".join(lines))


def test_runs_report_adds_the_iterations_of_warm_started_weights(tmp_path):
    report = _runs_report()
    _fake_run(
        tmp_path / "maml-5w5s",
        3000,
        [
            {"iteration": 0, "event": "warm_start", "from_iteration": 6000},
            {"iteration": 1000, "split": "val", "accuracy": 0.991},
            {"iteration": 2000, "split": "val", "accuracy": 0.993},
            {"iteration": 3000, "split": "val", "accuracy": 0.992},
        ],
    )
    _fake_run(tmp_path / "anil", 500, [{"iteration": 500, "split": "val", "accuracy": 0.4}], 1)
    rows = [report.summarise(tmp_path / "anil"), report.summarise(tmp_path / "maml-5w5s")]
    table = report.markdown(rows).splitlines()
    assert table[2] == "| anil | 500 | 2.0 | 2.0 (1 proc) | 40.0% at 500 | — |"
    assert table[3] == (
        "| maml-5w5s | 6,000 + 3,000 (warm start) | 2.0 | 4.0 (2 proc) | 99.3% at 2,000 | — |"
    )
    assert report.summarise(tmp_path / "empty") is None


def test_run_queue_passes_new_run_args_to_new_runs_only(tmp_path):
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake_paddlefsl.sh"
    # Records its arguments; "train" writes the stage's evaluation-ready checkpoint marker.
    fake.write_text(
        "#!/bin/bash\n"
        f'echo "$@" >> {calls}\n'
        'out=""; prev=""\n'
        'for a in "$@"; do [ "$prev" = --output ] && out=$a; prev=$a; done\n'
        'if [ "$1" = train ]; then\n'
        '  mkdir -p "$out/checkpoints"; touch "$out/checkpoints/last.json"\n'
        "fi\n"
        'if [ "$1" = eval ]; then echo "{}" > "$out/eval_test.json"; fi\n'
    )
    fake.chmod(0o755)
    env = {
        "PATH": "/usr/bin:/bin",
        "PADDLEFSL": str(fake),
        "NPROC": "1",
        "PLAN": "maml-omniglot-5w5s@10 maml-omniglot-5w5s@20",
        "NEW_RUN_ARGS": "--init-from zoo/x --seed 1",
    }
    runs = tmp_path / "runs"
    subprocess.run(
        ["bash", str(ROOT / "scripts/run_queue.sh"), str(runs), "omni", "mini"],
        env=env,
        check=True,
        capture_output=True,
    )
    train = [line for line in calls.read_text().splitlines() if line.startswith("train")]
    assert len(train) == 2
    assert "--preset maml-omniglot-5w5s" in train[0] and "--init-from zoo/x --seed 1" in train[0]
    assert "--resume" in train[1] and "--init-from" not in train[1]
    assert (runs / "maml-omniglot-5w5s/evals/20/eval_test.json").is_file()


def test_run_queue_passes_a_stop_signal_on_and_stops(tmp_path):
    calls = tmp_path / "calls.txt"
    started = tmp_path / "started"
    fake = tmp_path / "fake_paddlefsl.sh"
    # A train that runs until SIGTERM, then "checkpoints" and exits as paddlefsl does.
    fake.write_text(
        "#!/bin/bash\n"
        f'echo "$@" >> {calls}\n'
        f"trap 'echo TERM >> {calls}; exit 143' TERM\n"
        f"touch {started}\n"
        "while :; do sleep 0.05; done\n"
    )
    fake.chmod(0o755)
    env = {
        "PATH": "/usr/bin:/bin",
        "PADDLEFSL": str(fake),
        "NPROC": "1",
        "PLAN": "maml-omniglot-5w5s@10 anil-omniglot-5w1s@10",
    }
    log = tmp_path / "queue.log"
    with open(log, "w") as out:
        queue = subprocess.Popen(
            ["bash", str(ROOT / "scripts/run_queue.sh"), str(tmp_path / "runs"), "omni", "mini"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the cleanup reaches the fake too
        )
        try:
            deadline = time.monotonic() + 20
            while not started.exists():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            queue.send_signal(signal.SIGTERM)
            code = queue.wait(timeout=20)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(queue.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 143, text
    assert f"queue: pid {queue.pid}" in text.splitlines()[0]
    lines = calls.read_text().splitlines()
    assert lines[-1] == "TERM", lines  # the running train got the signal ...
    commands = [line for line in lines if line.startswith(("train", "eval"))]
    assert commands == lines[:1]  # ... and nothing ran after it


def test_runs_report_counts_each_stretch_with_its_own_process_count(tmp_path):
    report = _runs_report()
    run = tmp_path / "anneal" / "long"  # nested: named by its path below the root
    _fake_run(
        run,
        3000,
        [
            {"iteration": 0, "event": "start", "target": 3000, "nproc": 2},
            {"iteration": 1000, "elapsed": 3600.0},
            {"iteration": 1000, "event": "resume"},
            {"iteration": 1000, "event": "start", "target": 3000, "nproc": 1},
            {"iteration": 2990, "elapsed": 7000.0},
        ],
        nproc=1,
    )  # the checkpoint's elapsed: 7,200 s
    (run / "evals" / "test").mkdir(parents=True)
    (run / "evals" / "test" / "eval_test.json").write_text(
        json.dumps({"iteration": 3000, "mean": 0.995, "ci95": 0.0012})
    )
    (run / "evals" / "unfinished").mkdir()
    (run / "evals" / "unfinished" / "eval_test.json").write_text("{")
    assert report.find_runs(tmp_path) == [run]
    row = report.summarise(run, tmp_path)
    # 3,600 s on 2 processes, then 3,400 + 200 s on one: 10,800 core-seconds
    assert row["cpu_hours"] == 3.0 and row["hours"] == 2.0
    line = report.markdown([row]).splitlines()[2]
    assert line == (
        "| anneal/long | 3,000 | 2.0 | 3.0 (2, then 1 proc) | — | 99.50 ± 0.12% (iteration 3,000) |"
    )


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"scripts/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rotated_characters(characters: int, drawings: int = 6):
    """A ClassDataset named like Omniglot's with rotations: 4 classes per character."""
    import numpy as np

    from paddlefsl.data import ClassDataset

    names = [f"Alpha/character{c:02d}/rot{90 * r:03d}" for c in range(characters) for r in range(4)]
    labels = np.repeat(np.arange(len(names)), drawings)
    # Each image holds its own class id, so a test can read the class back from pixels.
    images = np.repeat(labels[:, None, None], 2, axis=1).repeat(2, axis=2).astype(np.uint8)
    return ClassDataset(images, labels, names), names


def test_eval_character_subsets_samples_distinct_characters_like_the_reference():
    import numpy as np

    spread = _script("eval_character_subsets")
    dataset, names = _rotated_characters(characters=7)
    tasks = spread.DistinctCharacterTasks(dataset, ways=5, shots=2, queries=3, seed=4)
    rotations_seen = set()
    for index in range(200):
        task = tasks.sample(index)
        characters = [spread.character_of(names[c]) for c in task.classes]
        assert len(set(characters)) == 5  # never one character at two rotations
        rotations_seen.update(names[c].rsplit("/", 1)[1] for c in task.classes)
        assert task.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        assert task.query_y.tolist() == [j for j in range(5) for _ in range(3)]
        # Support and query images come from the class named by the label, 5 distinct each.
        pixels_s = np.rint(task.support_x[:, 0, 0, 0] * 255).astype(int)
        pixels_q = np.rint(task.query_x[:, 0, 0, 0] * 255).astype(int)
        assert pixels_s.tolist() == np.repeat(task.classes, 2).tolist()
        assert pixels_q.tolist() == np.repeat(task.classes, 3).tolist()
    assert rotations_seen == {"rot000", "rot090", "rot180", "rot270"}
    # Deterministic in (seed, index).
    again = spread.DistinctCharacterTasks(dataset, ways=5, shots=2, queries=3, seed=4).sample(7)
    assert again.classes.tolist() == tasks.sample(7).classes.tolist()


def test_eval_character_subsets_keeps_only_the_chosen_characters():
    import numpy as np

    spread = _script("eval_character_subsets")
    dataset, names = _rotated_characters(characters=5, drawings=3)
    chosen = {"Alpha/character01", "Alpha/character04"}
    subset = spread.character_subset(dataset, chosen)
    assert subset.class_names == [n for n in names if spread.character_of(n) in chosen]
    assert len(subset) == 2 * 4 * 3
    # Every image still carries its own class: the images moved with their labels.
    pixels = np.rint(subset.get_images(np.arange(len(subset)))[:, 0, 0, 0] * 255).astype(int)
    assert pixels.tolist() == subset.labels.tolist()


def test_eval_character_subsets_only_scores_the_listed_characters_on_fixed_tasks(
    tmp_path, capsys, monkeypatch
):
    import argparse
    import types

    import pytest

    from paddlefsl.train.config import build_config
    from paddlefsl.train.evaluate import EvalResult

    spread = _script("eval_character_subsets")
    dataset, names = _rotated_characters(characters=9, drawings=10)
    monkeypatch.setattr(spread, "build_dataset", lambda config, split: dataset)
    seen = []

    def fake_evaluate(learner, tasks, steps):
        classes = [tasks[i].classes.tolist() for i in range(len(tasks))]
        seen.append(classes)
        return EvalResult.from_values("accuracy", [0.5 + 0.1 * i for i in range(len(tasks))], 0, 3)

    monkeypatch.setattr(spread, "evaluate", fake_evaluate)
    config, _ = build_config("maml-omniglot-5w5s")
    ckpt = types.SimpleNamespace(path="run/checkpoints/last.json", iteration=7)
    listed = tmp_path / "chars.txt"
    chosen = [f"Alpha/character{c:02d}" for c in (0, 2, 3, 5, 6, 8)]
    listed.write_text("# six of nine\n" + "\n".join(chosen + ["Other/character01"]) + "\n")
    parser = argparse.ArgumentParser()
    out = tmp_path / "only.json"
    args = argparse.Namespace(only=str(listed), tasks=4, sampling="classes", output=str(out))
    characters = spread.read_characters(parser, str(listed))
    assert characters == {*chosen, "Other/character01"}
    assert spread.evaluate_listed(args, config, ckpt, None, characters, parser) == 0
    assert "6 of the 9 test characters (1 listed ones are not test characters)" in (
        capsys.readouterr().out
    )
    report = json.loads(out.read_text())
    assert report["values"] == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert report["task_seed"] == spread.ONLY_SEED and report["iteration"] == 7
    assert report["characters"] == 6 and report["config"]["shots"] == 5
    # Every task is drawn from the listed characters, and the tasks are the same each time.
    drawn = {spread.character_of(names[c]) for task in seen[0] for c in task}
    assert drawn <= set(chosen) and len(drawn) >= 5
    spread.evaluate_listed(args, config, ckpt, None, characters, parser)
    assert seen[1] == seen[0]

    listed.write_text("Alpha/character01\nAlpha/character02\n")
    with pytest.raises(SystemExit):
        spread.evaluate_listed(
            args, config, ckpt, None, spread.read_characters(parser, str(listed)), parser
        )
    assert "2 of its 2 characters are test characters, fewer than the 5" in capsys.readouterr().err
    listed.write_text("# nothing\n")
    with pytest.raises(SystemExit):
        spread.read_characters(parser, str(listed))
    assert "lists no characters" in capsys.readouterr().err


# ------------------------------------------------------------- eval_cbfinn_checkpoint.py
def _cbfinn_script():
    return _script("eval_cbfinn_checkpoint")


def _tf_conv_same(x, w, stride=2):
    """TensorFlow's conv2d(x, w, stride, 'SAME') in NumPy: x NHWC, w HWIO."""
    import numpy as np

    n, size, _, _ = x.shape
    k = w.shape[0]
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    lo, hi = total // 2, total - total // 2
    xp = np.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    y = np.zeros((n, out, out, w.shape[3]))
    for i in range(k):
        for j in range(k):
            patch = xp[:, i : i + stride * out : stride, j : j + stride * out : stride, :]
            y += np.einsum("nhwc,co->nhwo", patch, w[i, j])
    return y


def _tf_reference_logits(arrays, x):
    """cbfinn/maml's forward_conv for Omniglot (batch-statistics BatchNorm, no scale)."""
    import numpy as np

    h = x.astype(np.float64)
    for i in range(1, 5):
        h = _tf_conv_same(h, arrays[f"conv{i}"]) + arrays[f"b{i}"]
        mean = h.mean(axis=(0, 1, 2), keepdims=True)
        var = ((h - mean) ** 2).mean(axis=(0, 1, 2), keepdims=True)
        h = np.maximum((h - mean) / np.sqrt(var + 1e-3) + arrays[f"beta{i}"], 0.0)
    return h.mean(axis=(1, 2)) @ arrays["w5"] + arrays["b5"]


def _random_cbfinn_arrays(seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {"conv1": rng.normal(0, 0.3, (3, 3, 1, 64))}
    for i in range(2, 5):
        arrays[f"conv{i}"] = rng.normal(0, 0.05, (3, 3, 64, 64))
    for i in range(1, 5):
        arrays[f"b{i}"] = rng.normal(0, 0.1, 64)
        arrays[f"beta{i}"] = rng.normal(0, 0.1, 64)
    arrays["w5"], arrays["b5"] = rng.normal(0, 1, (64, 5)), rng.normal(0, 0.1, 5)
    return arrays


def test_cbfinn_checkpoint_runs_as_the_tensorflow_network():
    import numpy as np
    import paddle

    from paddlefsl.train.builders import build_model
    from paddlefsl.train.config import build_config

    script = _cbfinn_script()
    arrays = _random_cbfinn_arrays()
    x = (np.random.default_rng(1).random((10, 28, 28, 1)) > 0.8).astype(np.float32)
    expected = _tf_reference_logits(arrays, x)
    logits = {}
    for padding in ("same", "symmetric"):
        config, _ = build_config(
            preset="maml-omniglot-5w5s", network="reference", conv_padding=padding
        )
        model = build_model(config)
        script.load_into(model, arrays)
        model.train()  # batch statistics, as the reference always uses
        logits[padding] = model(paddle.to_tensor(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(logits["same"], expected, rtol=1e-4, atol=1e-4)
    # Symmetric padding samples a shifted grid: --conv-padding same is needed.
    assert np.abs(logits["symmetric"] - expected).max() > 1e-2


def test_cbfinn_checkpoint_names_and_errors(tmp_path):
    import numpy as np
    import pytest

    script = _cbfinn_script()
    assert script.checkpoint_iteration("logs/omniglot5way5shot/cls_5/model13000") == 13000
    assert script.checkpoint_iteration("/x/ref250.npz") == 250
    assert script.checkpoint_iteration("/x/latest.npz") is None
    arrays = _random_cbfinn_arrays()
    del arrays["beta3"]
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(SystemExit, match="lacks \\['beta3'\\]"):
        script.read_arrays(str(tmp_path / "partial.npz"))
    arrays = _random_cbfinn_arrays()
    arrays["w5"] = np.zeros((64, 20))  # a 20-way model
    from paddlefsl.train.builders import build_model
    from paddlefsl.train.config import build_config

    model = build_model(build_config(preset="maml-omniglot-5w5s", network="reference")[0])
    with pytest.raises(SystemExit, match="head.weight.*5-way"):
        script.load_into(model, arrays)


def test_cbfinn_checkpoint_reader_takes_either_offset_naming(monkeypatch):
    import types

    import pytest

    script = _cbfinn_script()
    arrays = _random_cbfinn_arrays()

    def fake_tensorflow(names):
        class Reader:
            def get_variable_to_shape_map(self):
                return {name: arrays[key].shape for key, name in names.items()}

            def get_tensor(self, name):
                return arrays[next(k for k, n in names.items() if n == name)]

        train = types.SimpleNamespace(load_checkpoint=lambda prefix: Reader())
        monkeypatch.setitem(sys.modules, "tensorflow", types.SimpleNamespace(train=train))

    tf1 = {**script.TF_NAMES, **script.TF_ALIASES}  # TensorFlow 1: model/0/beta, ...
    for names in (script.TF_NAMES, tf1):
        fake_tensorflow(names)
        read = script.read_tf_checkpoint("logs/model1000")
        assert all((read[key] == arrays[key]).all() for key in script.TF_NAMES)
    fake_tensorflow({k: v for k, v in tf1.items() if k != "beta2"})
    with pytest.raises(SystemExit, match="missing \\['model/1/beta'\\]"):
        script.read_tf_checkpoint("logs/model1000")


def test_cbfinn_metagradient_comparison_converts_scale_and_layout(tmp_path):
    import numpy as np

    script = _script("cbfinn_metagradient")
    arrays = _random_cbfinn_arrays()
    rng = np.random.default_rng(3)
    tasks = {
        "support_x": (rng.random((2, 25, 1, 28, 28)) > 0.8).astype(np.float32),
        "support_y": np.tile(np.repeat(np.arange(5), 5), (2, 1)),
        "query_x": (rng.random((2, 25, 1, 28, 28)) > 0.8).astype(np.float32),
        "query_y": np.tile(np.repeat(np.arange(5), 5), (2, 1)),
    }
    # A float64 run of paddlefsl stands in for TensorFlow: stored as cbfinn/maml stores it.
    exact, loss = script.paddle_metagradient(arrays, tasks, "same", "float64")
    as_cbfinn = script.cbfinn_layout(exact)
    assert set(as_cbfinn) == set(script.TF_NAMES)
    assert as_cbfinn["conv2"].shape == arrays["conv2"].shape
    stored = {k: v * script.LOSS_SCALE for k, v in as_cbfinn.items()}
    np.savez(tmp_path / "reference.npz", loss=loss * script.LOSS_SCALE, **stored)
    np.savez(tmp_path / "weights.npz", **arrays)
    np.savez(tmp_path / "tasks.npz", **tasks)

    single, _ = script.paddle_metagradient(arrays, tasks, "same", "float32")
    rows, worst = script.compare(single, stored)
    assert worst < 1e-4 and len(rows) == 14
    # The conv biases right before BatchNorm have a zero gradient: not counted.
    assert {key for key, _, _, counted in rows if not counted} == {
        f"features.{i}.0.bias" for i in range(4)
    }
    shifted, _ = script.paddle_metagradient(arrays, tasks, "symmetric", "float32")
    assert script.compare(shifted, stored)[1] > 1e-2

    argv = ["compare", "--weights", str(tmp_path / "weights.npz"), "--tasks"]
    argv += [str(tmp_path / "tasks.npz"), "--reference", str(tmp_path / "reference.npz")]
    assert script.main(argv) == 0
    assert script.main([*argv, "--conv-padding", "symmetric"]) == 1


def test_cbfinn_metagradient_precision_tells_a_kink_from_a_rounding_error(tmp_path, capsys):
    import numpy as np
    import pytest

    script = _script("cbfinn_metagradient")

    def fake(weights, tasks, padding, dtype):
        """Task 0 rounds, task 1 sits on a kink at a = 1, task 2 is off in float32 only."""
        task, a = int(tasks["support_x"][0, 0]), float(weights["a"][0])
        value = 1.0
        if task == 1:
            value = 1.0 if (a > 1.0 or dtype == "float32") else 1.1
        if task == 2 and dtype == "float32":
            value = 1.1
        if task == 0 and dtype == "float32":
            value += 1e-7
        return {"g": np.array([value, 2.0]), "zero": np.zeros(2)}, 0.0

    weights = {"a": np.array([1.0])}
    tasks = {k: np.arange(3.0).reshape(3, 1) for k in script.TASK_KEYS}
    rows = script.task_precision(
        weights, tasks, metagradient=lambda w, t, d: fake(w, t, "same", d)[0], probes=8
    )
    (t0, d0, j0), (t1, d1, j1), (t2, d2, j2) = rows
    assert (t0, t1, t2) == (0, 1, 2)
    assert d0 == pytest.approx(5e-8) and j0 is None  # below the tolerance: not probed
    assert d1 == pytest.approx(0.05) and j1 == pytest.approx(0.05)  # the kink's own jump
    assert d2 == pytest.approx(0.05) and j2 == 0.0  # smooth in float64: a real difference

    np.savez(tmp_path / "weights.npz", **weights)
    np.savez(tmp_path / "tasks.npz", **tasks)
    script.read_arrays = lambda path: dict(np.load(path))
    script.paddle_metagradient = fake
    argv = ["precision", "--weights", str(tmp_path / "weights.npz")]
    assert script.main([*argv, "--tasks", str(tmp_path / "tasks.npz")]) == 1
    out = capsys.readouterr().out
    assert "task   1" in out and "a kink" in out and "NOT explained by a kink" in out
    assert "3 tasks; 2 above 0.001, 1 of them not at a kink" in out
    two = {k: v[:2] for k, v in tasks.items()}
    np.savez(tmp_path / "tasks.npz", **two)
    assert script.main([*argv, "--tasks", str(tmp_path / "tasks.npz")]) == 0
