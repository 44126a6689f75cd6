"""Stored parameters and time per training step of finished runs, over seeds, as a markdown table.

    python scripts/cost_table.py ROW_DIR [ROW_DIR ...] --seeds N [--output table.md] [--title T]

Each row directory holds ``seed0`` .. ``seed<N-1>`` (what ``scripts/lib.sh`` writes).  Per run:

* dyconv (``summary.json``): ``params_compact`` (stored parameters of the compact export, the
  whole model), ``mask_entries`` (mask bits stored, one per unit of the partition granularity) and
  ``train_seconds_per_step`` (seconds in training epochs over their steps, data loading included);
* GLUE (``all_results.json``): ``ffn_params_compact`` (the feed-forward layers), ``mask_entries``
  where recorded, and ``1 / train_steps_per_second`` (HF's ``train_runtime`` over its steps).

Each column is ``mean ± std (n)`` over seeds.  Times come from the training runs themselves, one
process per run: they compare rows run on the same machine under the same load only.  A missing
or unreadable run is one ``error:`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from pad.runtime import EXIT_BAD_INPUT

COLUMNS = ("stored parameters", "mask bits", "s / training step")


def run_costs(run: Path) -> tuple[float | None, float | None, float | None]:
    """``(stored parameters, mask bits, seconds per training step)`` of one finished run."""
    summary, results = run / "summary.json", run / "all_results.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        return data.get("params_compact"), data.get("mask_entries"), data.get("train_seconds_per_step")
    if results.is_file():
        data = json.loads(results.read_text())
        rate = data.get("train_steps_per_second")
        return data.get("ffn_params_compact"), data.get("mask_entries"), (1.0 / rate if rate else None)
    raise ValueError(f"{run} holds neither summary.json nor all_results.json")


def cell(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    mean = statistics.fmean(known)
    spread = statistics.stdev(known) if len(known) > 1 else 0.0
    digits = ".0f" if mean >= 100 else ".4g"
    return f"{mean:{digits}} ± {spread:{digits}} ({len(known)})"


def table(rows: list[Path], seeds: int, title: str) -> str:
    lines = [f"### {title}", "", "| row | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in rows:
        costs = [run_costs(row / f"seed{k}") for k in range(seeds)]
        lines.append(f"| {row.name} | " + " | ".join(cell(list(column)) for column in zip(*costs)) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="row directories")
    parser.add_argument("--seeds", type=int, required=True, help="each row holds ROW/seed0 .. ROW/seed<N-1>")
    parser.add_argument("--output", type=Path, help="also append the table to this file")
    parser.add_argument("--title", default="Cost")
    args = parser.parse_args(argv)
    try:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        text = table(args.runs, args.seeds, args.title)
    except (ValueError, OSError) as err:  # json.JSONDecodeError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(text)
    if args.output is not None:
        with open(args.output, "a") as handle:
            handle.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
