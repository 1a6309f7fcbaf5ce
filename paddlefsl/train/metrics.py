"""Metrics as JSON lines (``metrics.jsonl``) and a learning-curve plot made from them."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "plot_learning_curve", "read_metrics"]

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON object per line to ``<run>/metrics.jsonl``.

    Lines are flushed as written, so ``tail -f`` follows a run and a crash loses
    nothing already logged.

    Args:
        run_dir: The run's output folder.

    Example:
        >>> import tempfile
        >>> log = MetricsLog(tempfile.mkdtemp())
        >>> log.write({"iteration": 10, "split": "train", "loss": 1.2})
        >>> read_metrics(log.path)[0]["loss"]
        1.2

    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` as one line."""
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")

    def truncate_after(self, iteration: int) -> None:
        """Drop rows logged after ``iteration`` (those a resumed run will log again)."""
        if not self.path.is_file():
            return
        kept = [row for row in read_metrics(self.path) if row.get("iteration", 0) <= iteration]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        os.replace(tmp, self.path)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` file (a run folder works too); a torn last line is skipped.

    Example:
        >>> read_metrics("/nonexistent/metrics.jsonl")
        []

    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill
    return rows


def plot_learning_curve(
    metrics_path: str | os.PathLike,
    out_path: str | os.PathLike,
    tests: Sequence[Mapping[str, Any]] = (),
) -> str:
    """Plot training loss and train / validation metric against iterations as a PNG.

    matplotlib is optional: without it nothing is written and the returned note says so.

    Args:
        metrics_path: ``metrics.jsonl`` or the run folder holding it.
        out_path: Where to write the PNG.
        tests: Test results to draw with their 95% intervals, each with ``iteration``,
            ``mean`` and ``ci95`` (the reports of ``paddlefsl eval`` on the run's kept
            checkpoints).

    Returns:
        A one-line note on what was done.

    Example:
        >>> plot_learning_curve("/nonexistent", "/tmp/curve.png")
        'no metrics in /nonexistent: learning curve skipped'

    """
    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    if not train and not val:
        return f"no metrics in {metrics_path}: learning curve skipped"
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: learning curve skipped (pip install matplotlib)"
    metric = next((k for k in ("accuracy", "mse") if any(k in r for r in rows)), None)
    # A warm-started run (--init-from) continues weights trained for `offset` iterations
    # elsewhere: its curve is drawn where those iterations end.
    warm = next((r for r in rows if r.get("event") == "warm_start"), None)
    offset = int(warm.get("from_iteration", 0)) if warm else 0
    xlabel = f"iteration (warm start at {offset:,})" if warm else "iteration"
    panels = 2 if metric else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot([offset + r["iteration"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        val_x = [offset + r["iteration"] for r in val]
        ax.plot(val_x, [r["loss"] for r in val], "o-", label="val")
    ax.set(xlabel=xlabel, ylabel="query loss", title="meta-loss")
    ax.legend()
    if metric:
        ax = axes[0][1]
        ax.plot(
            [offset + r["iteration"] for r in train if metric in r],
            [r[metric] for r in train if metric in r],
            label="train",
        )
        if val:
            ax.errorbar(
                val_x,
                [r[metric] for r in val],
                yerr=[r.get("ci95", 0.0) for r in val],
                fmt="o-",
                label="val",
            )
        if tests:
            ax.errorbar(
                [offset + t["iteration"] for t in tests],
                [t["mean"] for t in tests],
                yerr=[t.get("ci95", 0.0) for t in tests],
                fmt="s-",
                label="test",
            )
        ax.set(xlabel=xlabel, ylabel=metric, title=metric)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return f"learning curve written to {out_path}"
