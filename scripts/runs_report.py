"""Summarise training runs: iterations, wall-clock, CPU-hours, validation and test accuracy.

Reads the run folders written by ``paddlefsl train`` (and the per-stage evaluations of
``scripts/run_queue.sh``) and prints one Markdown table, ready for docs/results.md.

    python scripts/runs_report.py ~/runs

CPU-hours are wall-clock x processes: every process of a ``--nproc`` run is single-threaded
(Paddle's default) and keeps one core busy, so this is the core time the run occupied.
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
    evals = []
    for file in sorted((run / "evals").glob("*/eval_test.json")):
        report = json.loads(file.read_text())
        report["stage"] = int(file.parent.name)
        evals.append(report)
    return sorted(evals, key=lambda r: r["stage"])


def summarise(run: Path) -> dict | None:
    """The numbers of one run folder, or None if it holds no checkpoint yet."""
    last = run / "checkpoints" / "last.json"
    if not last.is_file():
        return None
    record = json.loads(last.read_text())
    config, state = record.get("config", {}), record.get("state", {})
    hours = state.get("elapsed", 0.0) / 3600
    nproc = config.get("nproc") or 1
    metrics = _read_jsonl(run / "metrics.jsonl")
    vals = [r for r in metrics if r.get("split") == "val"]
    best_val = max(vals, key=lambda r: r["accuracy"]) if vals else None
    # A run started with --init-from continues weights trained elsewhere for this many
    # iterations; the table shows both parts.
    warm = next((r for r in metrics if r.get("event") == "warm_start"), None)
    return {
        "run": run.name,
        "iteration": record["iteration"],
        "warm_from": warm["from_iteration"] if warm else 0,
        "target": config.get("iterations"),
        "hours": hours,
        "cpu_hours": hours * nproc,
        "nproc": nproc,
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
    parser.add_argument("runs", type=Path, help="folder holding one sub-folder per run")
    args = parser.parse_args()
    if not args.runs.is_dir():
        parser.error(f"{args.runs} is not a folder")
    rows = [s for run in sorted(args.runs.iterdir()) if run.is_dir() and (s := summarise(run))]
    if not rows:
        parser.error(f"no run folders with checkpoints under {args.runs}")
    print(markdown(rows))


if __name__ == "__main__":
    main()
