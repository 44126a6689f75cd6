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
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

EXIT_BAD_INPUT = 2
CONFIDENCE = 0.95

# GLUE keys of all_results.json (moe/glue.py's metric names, HF's eval_ prefix, MNLI-mm with a _mm suffix)
GLUE_METRICS = {"eval_matthews_correlation": "MCC", "eval_accuracy": "acc", "eval_accuracy_mm": "acc-mm",
                "eval_f1": "F1", "eval_pearson": "Pearson", "eval_spearmanr": "Spearman"}
DYCONV_METRICS = {"top1": "top-1", "top5": "top-5"}


class InputError(Exception):
    """Bad input: printed as one ``error:`` line, exit status 2."""


@dataclass
class Row:
    """One configuration over its seeds: ``metrics[name]`` and ``score`` hold one value per seed."""
    name: str
    kind: str                                   # "dyconv", "glue" or "average"
    seeds: list[int]
    metrics: dict[str, list[float]] = field(default_factory=dict)
    score: list[float] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)
    machines: list[str] = field(default_factory=list)  # per seed, as the run recorded it ("" = not recorded)
    commits: list[str] = field(default_factory=list)   # per seed, the code's git commit ("" = not recorded)


# ---------------------------------------------------------------- reading runs

def read_results(run: Path) -> tuple[str, dict]:
    """``("dyconv", summary.json)`` or ``("glue", all_results.json)`` of one finished run."""
    for kind, name in (("dyconv", "summary.json"), ("glue", "all_results.json")):
        path = run / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise InputError(f"{path}: unreadable ({err})") from None
            if not isinstance(data, dict):
                raise InputError(f"{path}: expected a JSON object")
            return kind, data
    raise InputError(f"{run} holds neither summary.json nor all_results.json: did the run finish?")


def glue_task_score(results: dict) -> float:
    """The GLUE task score in percent: the mean of the task's metrics present in ``results``."""
    values = [results[key] for key in GLUE_METRICS if key in results]
    if not values:
        raise InputError(f"no GLUE metric ({', '.join(GLUE_METRICS)}) in the results")
    return 100.0 * float(np.mean(values))


def run_metrics(kind: str, results: dict, run: Path) -> tuple[dict[str, float], float]:
    """``({metric name: value}, score)`` of one run, in percent."""
    try:
        if kind == "dyconv":
            metrics = {label: float(results[key]) for key, label in DYCONV_METRICS.items()}
            return metrics, metrics["top-1"]
        metrics = {label: 100.0 * float(results[key]) for key, label in GLUE_METRICS.items() if key in results}
        return metrics, glue_task_score(results)
    except KeyError as err:
        raise InputError(f"{run}: results lack {err}") from None
    except InputError as err:
        raise InputError(f"{run}: {err}") from None


def _fmt_count(value) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.3f}M" if value >= 10_000 else str(value)


def run_info(kind: str, results: dict) -> dict[str, str]:
    """The columns that describe a configuration (same for every seed): taken from the first seed."""
    ratio = results.get("dynamic_ratio")
    info = {"dynamic ratio": "-" if ratio is None else f"{ratio:.4f}"}
    if kind == "dyconv":
        info.update({"arch": str(results.get("arch", "-")), "conv": str(results.get("conv", "-")),
                     "pad": str(results.get("pad", "-")), "params dense": _fmt_count(results.get("params_dense")),
                     "params compact": _fmt_count(results.get("params_compact")),
                     "epochs": str(results.get("epochs", "-"))})
    else:
        info.update({"moe": str(results.get("moe", "-")),
                     "FFN params dense": _fmt_count(results.get("ffn_params_dense")),
                     "FFN params compact": _fmt_count(results.get("ffn_params_compact"))})
    return info


def seed_dirs(row_dir: Path, seeds: int | None) -> list[tuple[int, Path]]:
    """``[(seed, run dir)]``: ``row_dir/seed<k>`` for k < seeds, or ``row_dir`` itself."""
    if seeds is None:
        return [(0, row_dir)]
    return [(k, row_dir / f"seed{k}") for k in range(seeds)]


def load_row(row_dir: Path, seeds: int | None) -> Row:
    """Reads every seed of one row; every seed must have finished."""
    runs = seed_dirs(row_dir, seeds)
    missing = [str(path) for _, path in runs
               if not ((path / "summary.json").is_file() or (path / "all_results.json").is_file())]
    if missing:
        raise InputError(f"row {row_dir.name}: {len(missing)} of {len(runs)} runs missing or unfinished: "
                         f"{', '.join(missing)}")
    row = None
    for seed, path in runs:
        kind, results = read_results(path)
        if seeds is None and "seed" in results and isinstance(results["seed"], int):
            seed = results["seed"]
        if row is None:
            row = Row(row_dir.name, kind, [], info=run_info(kind, results))
        elif kind != row.kind:
            raise InputError(f"row {row_dir.name}: seeds mix dyconv and GLUE runs")
        metrics, score = run_metrics(kind, results, path)
        for name, value in metrics.items():
            row.metrics.setdefault(name, []).append(value)
        if any(len(values) != len(row.score) + 1 for values in row.metrics.values()):
            raise InputError(f"{path}: its metrics ({', '.join(metrics)}) differ from the row's other seeds")
        row.seeds.append(seed)
        row.score.append(score)
        row.machines.append(str(results.get("machine", "")))
        row.commits.append(str(results.get("commit", "")))
    return row


# ---------------------------------------------------------------- statistics

def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for one value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


def t_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Two-sided ``confidence`` t-interval of the mean of ``values``; ``None`` for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean, std = mean_std(values)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def average_row(name: str, rows: list[Row]) -> Row:
    """Per seed, the unweighted mean of ``rows``' scores (the GLUE average); seeds must agree."""
    seeds = rows[0].seeds
    for row in rows:
        if row.seeds != seeds:
            raise InputError(f"average {name}: row {row.name} has seeds {row.seeds}, {rows[0].name} has {seeds}")
    scores = np.mean([row.score for row in rows], axis=0).tolist()
    return Row(name, "average", list(seeds), {"average": scores}, scores,
               {"of": ", ".join(row.name for row in rows)})


@dataclass
class Comparison:
    a: str
    b: str
    differences: list[float]      # a - b per seed
    seeds: list[int]

    @property
    def interval(self) -> tuple[float, float] | None:
        return t_interval(self.differences)


def compare(a: Row, b: Row) -> Comparison:
    """The paired difference of the scores ``a - b``, matched by seed."""
    common = [s for s in a.seeds if s in b.seeds]
    if not common or len(common) != len(a.seeds) or len(common) != len(b.seeds):
        raise InputError(f"compare {a.name} {b.name}: seeds {a.seeds} and {b.seeds} do not pair up")
    diffs = [a.score[a.seeds.index(s)] - b.score[b.seeds.index(s)] for s in common]
    return Comparison(a.name, b.name, diffs, common)


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

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise InputError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
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
        raise InputError(f"--seeds must be >= 1, got {args.seeds}")
    rows = [load_row(path, args.seeds) for path in args.runs]
    by_name = {}
    for row in rows:
        if row.name in by_name:
            raise InputError(f"two rows are named {row.name}")
        by_name[row.name] = row
    averages = []
    for name, *members in args.average:
        if not members:
            raise InputError(f"--average {name} needs at least one row")
        unknown = [m for m in members if m not in by_name]
        if unknown:
            raise InputError(f"--average {name}: unknown row(s) {', '.join(unknown)}")
        if any(by_name[m].kind != "glue" for m in members):
            raise InputError(f"--average {name}: only GLUE rows can be averaged")
        if name in by_name:
            raise InputError(f"--average {name}: the name is already taken")
        averages.append(average_row(name, [by_name[m] for m in members]))
        by_name[name] = averages[-1]
    comparisons = []
    for a, b in args.compare:
        unknown = [n for n in (a, b) if n not in by_name]
        if unknown:
            raise InputError(f"--compare {a} {b}: unknown row(s) {', '.join(unknown)}")
        comparisons.append(compare(by_name[a], by_name[b]))
    return report(rows, averages, comparisons)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        table = summarize(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"\n{args.title}\n\n{table}\n")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        produced = f"Produced by `{args.command}`.\n\n" if args.command else ""
        args.output.write_text(f"## {args.title}\n\n{produced}{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
