"""Summarise training runs: iterations, wall-clock, CPU-hours, validation and test accuracy.

Reads the run folders written by ``paddlefsl train`` (and the per-stage evaluations of
``scripts/run_queue.sh``) and prints one Markdown table, ready for docs/results.md.

    python scripts/runs_report.py ~/runs

Run folders are found at any depth (``~/runs/anneal/cos10k`` shows as ``anneal/cos10k``).
CPU-hours are wall-clock x processes: every process of a ``--nproc`` run is single-threaded
(Paddle's default) and keeps one core busy, so this is the core time the run occupied. A
resume may change ``--nproc``; each stretch of training counts with the process count its
``start`` event recorded (runs from before that record count with the current one).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill mid-write; the rest of the file is intact
    return rows


def _stage_evals(run: Path) -> list[dict]:
    """Test evaluations under ``<run>/evals/<name>/``, in the order of their iteration."""
    evals = []
    for file in (run / "evals").glob("*/eval_test.json"):
        try:
            report = json.loads(file.read_text())
            iteration = int(report["iteration"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not (yet) a finished evaluation report
        evals.append({**report, "iteration": iteration})
    return sorted(evals, key=lambda r: r["iteration"])


def cpu_seconds(metrics: list[dict], elapsed: float, default_nproc: int) -> float:
    """Core-seconds of a run: each stretch of training times its own process count.

    ``elapsed`` (the checkpoint's) counts on from the last logged row; a ``start`` event
    without ``nproc`` (older runs) counts with ``default_nproc``.

    Example:
        >>> rows = [{"event": "start", "nproc": 2}, {"elapsed": 100.0},
        ...         {"event": "resume"}, {"event": "start", "nproc": 1}, {"elapsed": 150.0}]
        >>> cpu_seconds(rows, 160.0, 1)
        260.0

    """
    nproc, seen, total = default_nproc, 0.0, 0.0
    for row in metrics:
        if row.get("event") == "start":
            nproc = row.get("nproc") or default_nproc
        elif isinstance(row.get("elapsed"), (int, float)):
            total += max(0.0, row["elapsed"] - seen) * nproc
            seen = max(seen, row["elapsed"])
    return total + max(0.0, elapsed - seen) * nproc


def find_runs(folder: Path) -> list[Path]:
    """Run folders (those holding ``checkpoints/last.json``) under ``folder``, sorted."""
    return sorted(last.parent.parent for last in folder.rglob("checkpoints/last.json"))


def summarise(run: Path, root: Path | None = None) -> dict | None:
    """The numbers of one run folder, or None if it holds no checkpoint yet.

    Args:
        run: the run folder.
        root: the folder the table is about; the run is named by its path below it.

    """
    last = run / "checkpoints" / "last.json"
    if not last.is_file():
        return None
    record = json.loads(last.read_text())
    config, state = record.get("config", {}), record.get("state", {})
    elapsed = float(state.get("elapsed", 0.0))
    nproc = config.get("nproc") or 1
    metrics = _read_jsonl(run / "metrics.jsonl")
    starts = [r.get("nproc") or nproc for r in metrics if r.get("event") == "start"]
    vals = [r for r in metrics if r.get("split") == "val"]
    best_val = max(vals, key=lambda r: r["accuracy"]) if vals else None
    # A run started with --init-from continues weights trained elsewhere for this many
    # iterations; the table shows both parts.
    warm = next((r for r in metrics if r.get("event") == "warm_start"), None)
    return {
        "run": run.relative_to(root).as_posix() if root else run.name,
        "iteration": record["iteration"],
        "warm_from": warm["from_iteration"] if warm else 0,
        "target": config.get("iterations"),
        "hours": elapsed / 3600,
        "cpu_hours": cpu_seconds(metrics, elapsed, nproc) / 3600,
        # the process counts the run trained with, in order (e.g. "2, then 1")
        "nproc": ", then ".join(
            str(n) for i, n in enumerate(starts) if i == 0 or n != starts[i - 1]
        )
        or str(nproc),
        "best_val": best_val,
        "evals": _stage_evals(run),
    }


def markdown(rows: list[dict]) -> str:
    """A Markdown table of :func:`summarise` rows."""
    lines = [
        "| run | iterations | wall-clock (h) | CPU-hours | best validation | test (600 tasks) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        val = r["best_val"]
        val_text = f"{100 * val['accuracy']:.1f}% at {val['iteration']:,}" if val else "—"
        tests = "; ".join(
            f"{100 * e['mean']:.2f} ± {100 * e['ci95']:.2f}% (iteration {e['iteration']:,})"
            for e in r["evals"]
        )
        done = f"{r['iteration']:,}"
        if r.get("warm_from"):
            done = f"{r['warm_from']:,} + {done} (warm start)"
        lines.append(
            f"| {r['run']} | {done} | {r['hours']:.1f} | "
            f"{r['cpu_hours']:.1f} ({r['nproc']} proc) | {val_text} | {tests or '—'} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Print the table for the run folders under the given folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="folder holding the run folders (any depth)")
    args = parser.parse_args()
    if not args.runs.is_dir():
        parser.error(f"{args.runs} is not a folder")
    rows = [s for run in find_runs(args.runs) if (s := summarise(run, args.runs))]
    if not rows:
        parser.error(f"no run folders with checkpoints under {args.runs}")
    print(markdown(rows))


if __name__ == "__main__":
    main()
