"""Prints (and optionally writes) a markdown table of finished runs.

    python scripts/summarize.py RUN_DIR [RUN_DIR ...] [--output results/table.md] [--title T]

A dyconv run directory holds ``summary.json`` (dyconv/main.py); a GLUE run directory holds
``all_results.json`` (moe/run_glue.py).  Missing runs are an error, never a blank row.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _fmt(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value / 1e6:.3f}M"
    return str(value)


def dyconv_row(run: Path, summary: dict) -> dict:
    return {
        "run": run.name, "arch": summary["arch"], "conv": summary["conv"], "pad": summary["pad"],
        "top-1": _fmt(summary["top1"]), "top-5": _fmt(summary["top5"]),
        "dynamic ratio": _fmt(summary.get("dynamic_ratio"), 4),
        "params dense": _fmt(summary["params_dense"]), "params compact": _fmt(summary["params_compact"]),
        "FLOPs": f"{summary['flops'] / 1e6:.1f}M", "epochs": summary["epochs"], "wall s": _fmt(summary["wall_seconds"], 0),
    }


GLUE_METRIC_KEYS = ("eval_matthews_correlation", "eval_accuracy", "eval_mm_accuracy", "eval_f1", "eval_pearson",
                    "eval_spearmanr", "eval_combined_score")


def glue_row(run: Path, results: dict) -> dict:
    row = {"run": run.name}
    row.update({k[len("eval_"):]: _fmt(100 * results[k]) for k in GLUE_METRIC_KEYS if k in results})
    row.update({"dynamic ratio": _fmt(results.get("dynamic_ratio"), 4),
                "FFN params dense": _fmt(results.get("ffn_params_dense")),
                "FFN params compact": _fmt(results.get("ffn_params_compact"))})
    return row


def load_row(run: Path) -> dict:
    if (run / "summary.json").is_file():
        return dyconv_row(run, json.loads((run / "summary.json").read_text()))
    if (run / "all_results.json").is_file():
        return glue_row(run, json.loads((run / "all_results.json").read_text()))
    raise FileNotFoundError(f"{run} holds neither summary.json nor all_results.json: did the run finish?")


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "-")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, help="also write the table (with the title and command) here")
    parser.add_argument("--title", default="Results")
    parser.add_argument("--command", default="", help="the command that produced the runs, recorded with the table")
    args = parser.parse_args(argv)
    try:
        table = markdown([load_row(run) for run in args.runs])
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"\n{args.title}\n{table}\n")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        produced = f"Produced by `{args.command}`.\n\n" if args.command else ""
        args.output.write_text(f"## {args.title}\n\n{produced}{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
