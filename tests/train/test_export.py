import hashlib
import json

import numpy as np
import pytest
from train_helpers import SINUSOID_TRAIN, cli_error

from paddlefsl.cli import main
from paddlefsl.train import (
    CheckpointError,
    CheckpointManager,
    TrainConfig,
    build_config,
    export_checkpoint,
    load_checkpoint,
)
from paddlefsl.train import checkpoint as ckpt_module
from paddlefsl.train.builders import build_learner

SINUSOID = SINUSOID_TRAIN
EVAL = ["--eval-tasks", "5", "--no-progress"]


@pytest.fixture
def run(factory, tmp_path):
    """A tiny classification run (3 iterations): best and last checkpoints, metrics.jsonl."""
    factory.classification(output_dir=tmp_path / "run", eval_every=1).fit(3)
    return tmp_path / "run"


@pytest.fixture
def other(factory, tmp_path):
    """Another run, with other weights."""
    factory.classification(output_dir=tmp_path / "other", init_seed=1).fit(1)
    return tmp_path / "other"


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_holds_the_weights_only(run, tmp_path):
    source = json.loads((run / "checkpoints" / "best.json").read_text())
    record_path = export_checkpoint(run, tmp_path / "zoo")
    out = tmp_path / "zoo"
    assert record_path == out / "best.json"
    assert sorted(p.name for p in out.iterdir()) == ["best.json", "metrics.jsonl", "model.pdparams"]

    record = json.loads(record_path.read_text())
    assert "rng" not in record and record["files"] == {"model": "model.pdparams"}
    assert record["sha256"] == {"model": _sha(out / "model.pdparams")}
    assert record["tag"] == "best" and record["format"] == source["format"]
    assert record["iteration"] == source["iteration"] and record["state"] == source["state"]
    assert record["config"] == source["config"]  # no output / data_root fields to clear
    assert record["exported_from"] == {
        "record": str(run / "checkpoints" / "best.json"),
        "saved_at": source["saved_at"],
    }
    # Bitwise the same weights, and the learning curve.
    original = run / "checkpoints" / source["files"]["model"]
    assert (out / "model.pdparams").read_bytes() == original.read_bytes()
    assert (out / "metrics.jsonl").read_bytes() == (run / "metrics.jsonl").read_bytes()

    exported, loaded = load_checkpoint(out), load_checkpoint(run)
    assert exported.optimizer_state is None and exported.run_dir == out
    assert exported.iteration == loaded.iteration
    for key, value in loaded.model_state.items():
        np.testing.assert_array_equal(exported.model_state[key].numpy(), value.numpy())
    with pytest.raises(CheckpointError, match="it is an export"):
        exported.load_optimizer(None, None)

    # Exporting the same weights again is allowed and gives the same files.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    export_checkpoint(run / "checkpoints" / source["files"]["model"], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_damaged_source_is_refused(run, tmp_path):
    record = json.loads((run / "checkpoints" / "last.json").read_text())
    weights = run / "checkpoints" / record["files"]["model"]
    weights.write_bytes(weights.read_bytes()[:-8] + b"damaged!")
    with pytest.raises(CheckpointError, match="damaged"):
        export_checkpoint(run, tmp_path / "zoo", which="last")
    assert not (tmp_path / "zoo").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        export_checkpoint(tmp_path / "empty", tmp_path / "zoo")
    (run / "checkpoints" / "last.json").write_text('{"format": "paddlefsl-checkpoint/1"}')
    with pytest.raises(CheckpointError, match="incomplete"):
        export_checkpoint(run / "checkpoints" / "last.json", tmp_path / "zoo")


def test_different_export_needs_overwrite(run, other, tmp_path):
    out = tmp_path / "zoo"
    export_checkpoint(run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "eval_test.json").write_text("{}")  # from evaluating the first export
    (out / "README.md").write_text("mine")
    with pytest.raises(CheckpointError, match=r"different export \(iteration \d+ of .*--force"):
        export_checkpoint(other, out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before

    export_checkpoint(other, out, overwrite=True)
    record = json.loads((out / "best.json").read_text())
    assert record["exported_from"]["record"] == str(other / "checkpoints" / "best.json")
    assert load_checkpoint(out).iteration == 1
    assert not (out / "eval_test.json").exists()  # described the replaced weights
    assert (out / "README.md").read_text() == "mine"

    # Never into a training run, even with overwrite.
    with pytest.raises(CheckpointError, match="training run"):
        export_checkpoint(out, run, overwrite=True)


def test_interrupted_replacement_leaves_no_wrong_record(run, other, tmp_path, monkeypatch):
    out = tmp_path / "zoo"
    export_checkpoint(run, out)

    def crash(handle, data):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt_module, "_write_all", crash)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(other, out, overwrite=True)
    monkeypatch.undo()
    # The old record is gone (it must not point at other weights); no temporary files.
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "model.pdparams"]
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(out)
    with pytest.raises(CheckpointError, match=r"interrupted export\?\); pass --force"):
        export_checkpoint(other, out)
    export_checkpoint(other, out, overwrite=True)
    assert load_checkpoint(out).iteration == 1


def test_export_clears_machine_paths(tmp_path, capsys):
    config, _ = build_config(
        dataset="omniglot", hidden=4, data_root=str(tmp_path / "data"), output="runs/x"
    )
    learner = build_learner(config)
    CheckpointManager(tmp_path / "run").save(
        ["best", "last"], learner.module, None, iteration=7, config=config.to_dict()
    )
    argv = ["export", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "z")]
    assert main(argv) == 0
    assert "--data-root DIR" in capsys.readouterr().out
    record = json.loads((tmp_path / "z" / "best.json").read_text())
    assert record["config"]["data_root"] is None and record["config"]["output"] is None
    restored = TrainConfig.from_dict(record["config"]).validate()
    assert restored.to_dict() == dict(config.to_dict(), data_root=None, output=None)
    # Evaluation then asks for the dataset folder.
    line = cli_error(capsys, ["eval", "--checkpoint", str(tmp_path / "z"), "--no-progress"])
    assert "--data-root is required" in line


def test_cli_export_then_eval_gives_the_same_result(capsys, tmp_path, other):
    run, out = tmp_path / "run", tmp_path / "zoo" / "sinusoid"
    assert main(SINUSOID + ["--output", str(run)]) == 0
    capsys.readouterr()

    assert main(["export", "--checkpoint", str(run), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"to {out}: model.pdparams" in printed and "metrics.jsonl" in printed
    assert f"Evaluate with: paddlefsl eval --checkpoint {out}" in printed

    assert main(["eval", "--checkpoint", str(run)] + EVAL) == 0
    assert main(["eval", "--checkpoint", str(out)] + EVAL) == 0
    original = json.loads((run / "eval_test.json").read_text())
    exported = json.loads((out / "eval_test.json").read_text())  # in the export folder
    for key in ("mean", "ci95", "std", "values", "iteration", "num_tasks", "config"):
        assert exported[key] == original[key], key
    assert exported["checkpoint"] == str(out / "best.json")

    # Exporting again the same weights refreshes the folder; other weights need --force.
    assert main(["export", "--checkpoint", str(run), "--output", str(out)]) == 0
    capsys.readouterr()
    line = cli_error(capsys, ["export", "--checkpoint", str(other), "--output", str(out)])
    assert line.startswith("paddlefsl export: error:") and "different export" in line
    assert "--force" in line and (out / "eval_test.json").is_file()
    assert main(["export", "--checkpoint", str(other), "--output", str(out), "--force"]) == 0
    assert "load it with paddlefsl.train.load_checkpoint" in capsys.readouterr().out
    assert not (out / "eval_test.json").exists()

    (run / "checkpoints" / "best.json").write_text("{}")
    line = cli_error(capsys, ["export", "--checkpoint", str(run), "--output", str(tmp_path / "x")])
    assert "not a paddlefsl checkpoint record" in line
    line = cli_error(capsys, ["export", "--checkpoint", str(run)])
    assert "--output" in line
