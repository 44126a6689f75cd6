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

import statistics
import sys
from pathlib import Path

from pad.records import read_results
from pad.runtime import OneLineParser, UsageError, WriteError, atomic_write, report_error

COLUMNS = ("stored parameters", "mask bits", "s / training step")


def run_costs(run: Path) -> tuple[float | None, float | None, float | None]:
    """``(stored parameters, mask bits, seconds per training step)`` of one finished run; :class:`UsageError`
    naming the run when it has no results or a recorded cost is not a number."""
    kind, data = read_results(run)
    keys = (("params_compact", "mask_entries", "train_seconds_per_step") if kind == "dyconv"
            else ("ffn_params_compact", "mask_entries", "train_steps_per_second"))
    values = [data.get(key) for key in keys]
    for key, value in zip(keys, values):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UsageError(f"{run}: {key} is not a number ({value!r})")
    if kind == "glue":
        values[2] = 1.0 / values[2] if values[2] else None
    return tuple(values)


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
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="row directories")
    parser.add_argument("--seeds", type=int, required=True, help="each row holds ROW/seed0 .. ROW/seed<N-1>")
    parser.add_argument("--output", type=Path, help="also append the table to this file")
    parser.add_argument("--title", default="Cost")
    try:
        args = parser.parse_args(argv)
        if args.seeds < 1:
            raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
        text = table(args.runs, args.seeds, args.title)
        print(text)
        if args.output is not None:
            before = args.output.read_text() if args.output.is_file() else ""
            atomic_write(args.output, before + "\n" + text, parents=True)
    except (UsageError, WriteError, OSError, ValueError) as err:  # OSError/ValueError: an unreadable --output
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
