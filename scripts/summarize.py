"""Prints (and optionally writes) a markdown table of finished runs, over seeds, with paired comparisons.

    python scripts/summarize.py ROW_DIR [ROW_DIR ...] [--seeds N] [--compare ROW_A ROW_B ...]
        [--average NAME ROW [ROW ...]] [--output results/table.md] [--title T] [--command C]

A row is one configuration.  With ``--seeds N`` a row directory holds one run per seed,
``ROW_DIR/seed0`` .. ``ROW_DIR/seed<N-1>`` (what ``scripts/lib.sh`` writes); without it, the row
directory is itself one run.  A dyconv run holds ``summary.json`` (dyconv/main.py), a GLUE run
``all_results.json`` (moe/run_glue.py).  Missing or unreadable runs are an error (one ``error:``
line, exit status 2), never a blank row.

Each metric is reported as ``mean ± std (n)`` over seeds (sample standard deviation).  A row's
*score* is what comparisons use: top-1 for dyconv; for GLUE the task score, the mean of the task's
metrics (MRPC/QQP accuracy and F1, STS-B Pearson and Spearman, MNLI matched and mismatched
accuracy; every other task its one metric), in percent.  ``--average NAME ROW...`` adds a row whose
per-seed score is the unweighted mean of the rows' task scores (the GLUE average).
``--compare A B`` reports the difference A - B of the scores, paired by seed, with its mean,
standard deviation and a 95% t-interval (``scipy.stats.t``, n - 1 degrees of freedom).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pad.records import (CONFIDENCE, DYCONV_METRICS, GLUE_METRICS, Comparison, Row, average_row, compare,
                         load_row, mean_std)
from pad.runtime import OneLineParser, UsageError, WriteError, atomic_write, report_error


# ---------------------------------------------------------------- tables

def fmt_stat(values: list[float]) -> str:
    """``mean ± std (n)``; ``mean (1)`` for a single seed."""
    mean, std = mean_std(values)
    return f"{mean:.2f} ({len(values)})" if std is None else f"{mean:.2f} ± {std:.2f} ({len(values)})"


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "-")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def row_table(rows: list[Row]) -> str:
    """One line per row: every metric (columns in a fixed order), the GLUE task score, the row's info."""
    metric_order = list(DYCONV_METRICS.values()) + list(GLUE_METRICS.values())
    present = [m for m in metric_order if any(m in row.metrics for row in rows)]
    table = []
    for row in rows:
        cells = {"row": row.name}
        cells.update({name: fmt_stat(row.metrics[name]) if name in row.metrics else "-" for name in present})
        if any(r.kind == "glue" for r in rows):
            cells["task score"] = fmt_stat(row.score) if row.kind == "glue" else "-"
        cells.update(row.info)
        table.append(cells)
    return markdown(table)


def average_table(rows: list[Row]) -> str:
    return markdown([{"average": row.name, "mean ± std (n)": fmt_stat(row.score),
                      "per seed": ", ".join(f"seed{s}: {v:.2f}" for s, v in zip(row.seeds, row.score)),
                      "of rows": row.info["of"]} for row in rows])


def comparison_table(comparisons: list[Comparison]) -> str:
    table = []
    for c in comparisons:
        interval = c.interval
        table.append({"comparison": f"{c.a} - {c.b}", "mean difference ± std (n)": fmt_stat(c.differences),
                      f"{100 * CONFIDENCE:.0f}% t-interval": "- (one seed)" if interval is None
                      else f"[{interval[0]:.2f}, {interval[1]:.2f}]",
                      "per seed": ", ".join(f"{d:+.2f}" for d in c.differences)})
    return markdown(table)


def recorded_line(label: str, values: list[str]) -> str:
    """``<label>: <value> (n runs); ...`` over the runs' recorded values, in order of first appearance."""
    counts: dict[str, int] = {}
    for value in values:
        counts[value or "not recorded"] = counts.get(value or "not recorded", 0) + 1
    return f"{label}: " + "; ".join(f"{name} ({n} run{'s' if n > 1 else ''})" for name, n in counts.items())


def report(rows: list[Row], averages: list[Row], comparisons: list[Comparison]) -> str:
    parts = [row_table(rows)]
    if averages:
        parts.append("Averages of task scores (per seed, then mean ± std over seeds):\n\n" + average_table(averages))
    if comparisons:
        parts.append("Paired differences of the scores (top-1 or task score), by seed:\n\n"
                     + comparison_table(comparisons))
    parts.append(recorded_line("Machine", [m for row in rows for m in row.machines]) + "  \n"
                 + recorded_line("Commit", [c for row in rows for c in row.commits]))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("runs", nargs="+", type=Path, help="row directories")
    parser.add_argument("--seeds", type=int, help="each row holds ROW/seed0 .. ROW/seed<N-1>")
    parser.add_argument("--compare", nargs=2, action="append", default=[], metavar=("ROW_A", "ROW_B"),
                        help="report ROW_A - ROW_B paired by seed (rows or averages, by name)")
    parser.add_argument("--average", nargs="+", action="append", default=[], metavar="NAME ROW",
                        help="add NAME: per seed the mean of the rows' scores (the GLUE average)")
    parser.add_argument("--output", type=Path, help="also write the table (with the title and command) here")
    parser.add_argument("--title", default="Results")
    parser.add_argument("--command", default="", help="the command that produced the runs, recorded with the table")
    return parser


def summarize(args: argparse.Namespace) -> str:
    if args.seeds is not None and args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    rows = [load_row(path, args.seeds) for path in args.runs]
    by_name = {}
    for row in rows:
        if row.name in by_name:
            raise UsageError(f"two rows are named {row.name}")
        by_name[row.name] = row
    averages = []
    for name, *members in args.average:
        if not members:
            raise UsageError(f"--average {name} needs at least one row")
        unknown = [m for m in members if m not in by_name]
        if unknown:
            raise UsageError(f"--average {name}: unknown row(s) {', '.join(unknown)}")
        if any(by_name[m].kind != "glue" for m in members):
            raise UsageError(f"--average {name}: only GLUE rows can be averaged")
        if name in by_name:
            raise UsageError(f"--average {name}: the name is already taken")
        averages.append(average_row(name, [by_name[m] for m in members]))
        by_name[name] = averages[-1]
    comparisons = []
    for a, b in args.compare:
        unknown = [n for n in (a, b) if n not in by_name]
        if unknown:
            raise UsageError(f"--compare {a} {b}: unknown row(s) {', '.join(unknown)}")
        comparisons.append(compare(by_name[a], by_name[b]))
    return report(rows, averages, comparisons)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        table = summarize(args)
        print(f"\n{args.title}\n\n{table}\n")
        if args.output:
            produced = f"Produced by `{args.command}`.\n\n" if args.command else ""
            atomic_write(args.output, f"## {args.title}\n\n{produced}{table}\n", parents=True)
    except (UsageError, WriteError) as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
