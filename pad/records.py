"""The records of finished runs, read and compared over seeds: what ``scripts/summarize.py``,
``scripts/figures.py`` and ``scripts/suite_cost.py`` tabulate and plot.

A dyconv run (``dyconv/main.py``) leaves ``summary.json``, a GLUE run (``moe/run_glue.py``)
``all_results.json``.  A row is one configuration: one run per seed (``ROW/seed<k>``) or one run
(the row folder itself).  Its *score* is what comparisons use: top-1 for dyconv; for GLUE the task
score, the mean of the task's metrics in percent.  Missing, unfinished or unreadable runs are a
:class:`pad.runtime.UsageError` naming the file, never a blank row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from pad.runtime import UsageError, error_line, read_json

CONFIDENCE = 0.95

# GLUE keys of all_results.json (moe/glue.py's metric names, HF's eval_ prefix, MNLI-mm with a _mm suffix)
GLUE_METRICS = {"eval_matthews_correlation": "MCC", "eval_accuracy": "acc", "eval_accuracy_mm": "acc-mm",
                "eval_f1": "F1", "eval_pearson": "Pearson", "eval_spearmanr": "Spearman"}
DYCONV_METRICS = {"top1": "top-1", "top5": "top-5"}


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
                return kind, read_json(path)
            except ValueError as err:  # names the file and what is wrong with it
                raise UsageError(error_line(err)) from None
    raise UsageError(f"{run} holds neither summary.json nor all_results.json: did the run finish?")


def glue_task_score(results: dict) -> float:
    """The GLUE task score in percent: the mean of the task's metrics present in ``results``."""
    values = [results[key] for key in GLUE_METRICS if key in results]
    if not values:
        raise UsageError(f"no GLUE metric ({', '.join(GLUE_METRICS)}) in the results")
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
        raise UsageError(f"{run}: results lack {err}") from None
    except (TypeError, ValueError):
        raise UsageError(f"{run}: a metric in its results is not a number") from None
    except UsageError as err:
        raise UsageError(f"{run}: {err}") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt_count(value) -> str:
    if not _is_number(value):
        return "-" if value is None else str(value)
    return f"{value / 1e6:.3f}M" if value >= 10_000 else str(value)


def run_info(kind: str, results: dict) -> dict[str, str]:
    """The columns that describe a configuration (same for every seed): taken from the first seed."""
    ratio = results.get("dynamic_ratio")
    info = {"dynamic ratio": f"{ratio:.4f}" if _is_number(ratio) else "-" if ratio is None else str(ratio)}
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
        raise UsageError(f"row {row_dir.name}: {len(missing)} of {len(runs)} runs missing or unfinished: "
                         f"{', '.join(missing)}")
    row = None
    for seed, path in runs:
        kind, results = read_results(path)
        if seeds is None and "seed" in results and isinstance(results["seed"], int):
            seed = results["seed"]
        if row is None:
            row = Row(row_dir.name, kind, [], info=run_info(kind, results))
        elif kind != row.kind:
            raise UsageError(f"row {row_dir.name}: seeds mix dyconv and GLUE runs")
        metrics, score = run_metrics(kind, results, path)
        for name, value in metrics.items():
            row.metrics.setdefault(name, []).append(value)
        if any(len(values) != len(row.score) + 1 for values in row.metrics.values()):
            raise UsageError(f"{path}: its metrics ({', '.join(metrics)}) differ from the row's other seeds")
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
            raise UsageError(f"average {name}: row {row.name} has seeds {row.seeds}, {rows[0].name} has {seeds}")
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
        raise UsageError(f"compare {a.name} {b.name}: seeds {a.seeds} and {b.seeds} do not pair up")
    diffs = [a.score[a.seeds.index(s)] - b.score[b.seeds.index(s)] for s in common]
    return Comparison(a.name, b.name, diffs, common)
