import sys

import pytest

from paddlefsl.train import MetricsLog, plot_learning_curve, read_metrics


def _log(tmp_path):
    log = MetricsLog(tmp_path)
    for it in (10, 20, 30):
        log.write({"iteration": it, "split": "train", "loss": 1.0 / it, "accuracy": it / 40})
    log.write({"iteration": 20, "split": "val", "loss": 0.5, "accuracy": 0.6, "ci95": 0.1})
    return log


def test_torn_last_line_is_skipped(tmp_path):
    log = _log(tmp_path)
    with open(log.path, "a") as handle:
        handle.write('{"iteration": 40, "spl')  # killed mid-line
    rows = read_metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [10, 20, 30, 20]


def test_truncate_after(tmp_path):
    log = _log(tmp_path)
    log.truncate_after(20)
    assert [(r["iteration"], r["split"]) for r in read_metrics(log.path)] == [
        (10, "train"),
        (20, "train"),
        (20, "val"),
    ]


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch):
    _log(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now fails
    note = plot_learning_curve(tmp_path, tmp_path / "curve.png")
    assert "matplotlib is not installed" in note
    assert not (tmp_path / "curve.png").exists()


def test_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    _log(tmp_path)
    note = plot_learning_curve(tmp_path, tmp_path / "curve.png")
    assert "written" in note and (tmp_path / "curve.png").stat().st_size > 0
