"""The committed model zoo: every entry loads into its network and matches its results.

Without the datasets only integrity is checked (record, checksum, architecture, README);
with them (``-m slow``) each entry is re-evaluated on its 600 test tasks and must give the
committed accuracy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from paddlefsl.train.builders import build_learner
from paddlefsl.train.checkpoint import load_checkpoint
from paddlefsl.train.config import TrainConfig

ZOO = Path(__file__).resolve().parents[1] / "zoo"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ENTRIES = sorted(p.parent for p in ZOO.glob("*/best.json"))


def _data_root(dataset: str) -> Path | None:
    """Omniglot from ``$PADDLEFSL_DATA``; miniImageNet, whose images are not in shared/,
    from ``$PADDLEFSL_MINI_ROOT`` or a shared folder that holds ``images/``."""
    shared = Path(os.environ.get("PADDLEFSL_DATA", SHARED_DATA)) / dataset
    if dataset != "miniimagenet":
        return shared if shared.is_dir() else None
    for candidate in (os.environ.get("PADDLEFSL_MINI_ROOT"), shared):
        if candidate and (Path(candidate) / "images").is_dir():
            return Path(candidate)
    return None


def _config(entry: Path) -> TrainConfig:
    return TrainConfig.from_dict(load_checkpoint(entry).config).validate()


def test_zoo_has_entries_with_results():
    # An empty zoo would make every test below vacuous.
    assert ENTRIES, f"no model-zoo entries under {ZOO}"
    for entry in ENTRIES:
        assert (entry / "eval_test.json").is_file(), f"{entry.name}: no eval_test.json"


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_entry_loads_into_its_network(entry: Path):
    ckpt = load_checkpoint(entry)  # verifies the sha256 of the weights
    config = _config(entry)
    assert config.preset == entry.name
    assert ckpt.optimizer_state is None, "zoo entries hold weights only"
    learner = build_learner(config)
    ckpt.load_model(learner.module)
    names = {n for n, _ in learner.module.named_parameters()}
    assert names <= set(ckpt.model_state), "weights missing from the entry"
    report = json.loads((entry / "eval_test.json").read_text())
    assert report["iteration"] == ckpt.iteration
    assert report["num_tasks"] == 600 and report["split"] == "test"


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_readme_states_the_committed_result(entry: Path):
    readme = (ZOO / "README.md").read_text()
    report = json.loads((entry / "eval_test.json").read_text())
    result = f"{100 * report['mean']:.2f} ± {100 * report['ci95']:.2f}"
    assert f"paddlefsl eval --checkpoint zoo/{entry.name}" in readme
    assert result in readme, f"zoo/README.md should quote {result} for {entry.name}"


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_entry_reproduces_its_accuracy(entry: Path, tmp_path: Path):
    from paddlefsl.cli import main

    config = _config(entry)
    root = _data_root(config.dataset)
    if root is None:
        pytest.skip(f"{config.dataset} not found (see tests/data/test_data_real.py)")
    committed = json.loads((entry / "eval_test.json").read_text())
    args = ["eval", "--checkpoint", str(entry), "--data-root", str(root), "--no-progress"]
    assert main([*args, "--output", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "eval_test.json").read_text())
    # Same weights, same seeded tasks: only summation order in the kernels may differ.
    assert again["mean"] == pytest.approx(committed["mean"], abs=2e-3)
    assert again["ci95"] == pytest.approx(committed["ci95"], abs=2e-3)
