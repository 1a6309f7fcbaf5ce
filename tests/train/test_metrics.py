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


def _warm_started_figure(run, monkeypatch, from_iteration, val=(), tests=()):
    """The figure plot_learning_curve draws for a warm-started run's log (not saved)."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    log = MetricsLog(run)
    log.write({"iteration": 0, "event": "warm_start", "from_iteration": from_iteration})
    log.write({"iteration": 10, "split": "train", "loss": 0.1, "accuracy": 0.9})
    log.write({"iteration": 20, "split": "train", "loss": 0.1, "accuracy": 0.9})
    for row in val:
        log.write(row)
    figures = []
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig)
    )
    plot_learning_curve(run, run / "curve.png", tests)
    return figures[0]


def test_plot_of_a_warm_started_run_continues_the_iterations(tmp_path, monkeypatch):
    val = [{"iteration": 20, "split": "val", "loss": 0.2, "accuracy": 0.8, "ci95": 0.01}]
    loss_axes, metric_axes = _warm_started_figure(tmp_path, monkeypatch, 6000, val).axes
    assert [list(line.get_xdata()) for line in loss_axes.lines] == [[6010, 6020], [6020]]
    assert "warm start at 6,000" in metric_axes.get_xlabel()


def test_plot_draws_test_results_with_their_intervals(tmp_path, monkeypatch):
    tests = [
        {"iteration": 10, "mean": 0.95, "ci95": 0.01},
        {"iteration": 20, "mean": 0.97, "ci95": 0.02},
    ]
    metric_axes = _warm_started_figure(tmp_path, monkeypatch, 100, tests=tests).axes[1]
    (test,) = [c for c in metric_axes.containers if c.get_label() == "test"]
    data_line, _, (bars,) = test.lines
    assert list(data_line.get_xdata()) == [110, 120]  # drawn after the warm start too
    assert list(data_line.get_ydata()) == [0.95, 0.97]
    # one vertical bar per point, from mean - ci95 to mean + ci95
    spans = [tuple(segment[:, 1].round(6)) for segment in bars.get_segments()]
    assert spans == [(0.94, 0.96), (0.95, 0.99)]
