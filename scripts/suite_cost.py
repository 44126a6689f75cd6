"""What a suite of runs cost, from the runs' own records: run-seconds per script and in all.

    python scripts/suite_cost.py [--runs results/runs] [--scale mini] [--jobs 2] [--scripts NAME ...] [--output FILE.md]

Every ``RUNS/<script>-<scale>/<row>/seed<k>`` that is a folder of its own is counted once; one that
is a link (a row shared with another script, see ``scripts/lib.sh``) is the other script's run and
is not counted again.  A run's time is what it recorded:

* dyconv (``summary.json``): ``wall_seconds``, from the start of ``dyconv/main.py`` to its summary;
* GLUE (``all_results.json``): ``train_runtime + eval_runtime`` (Hugging Face's), which leaves out
  loading the model and the data (a few seconds per run).

A run that was paused (for a benchmark, or stopped and resumed) carries the pause, and the suite
pauses two runs at once, so the recorded sum is an upper bound; the report also gives a lower one,
each row's fastest run times its runs.  With ``--jobs J`` (how many runs ran at once) the wall time of
the whole suite is about the run-seconds over ``J``.  A finished run without a
time is counted and named; an unreadable record is one ``error:`` line, exit status 2.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from pad.records import read_results
from pad.runtime import OneLineParser, UsageError, WriteError, atomic_write, report_error


def run_seconds(run: Path) -> tuple[str, float | None]:
    """``(kind, seconds)`` of one finished run; ``kind`` is ``image`` or ``text``; ``None`` when it
    recorded no time; ``("", None)`` when it has not finished."""
    if not ((run / "summary.json").is_file() or (run / "all_results.json").is_file()):
        return "", None
    kind, data = read_results(run)
    if kind == "dyconv":
        return "image", data.get("wall_seconds")
    parts = [data.get("train_runtime"), data.get("eval_runtime")]
    return "text", None if None in parts else float(sum(parts))


def suite_costs(runs: Path, scale: str, scripts: list[str] | None = None) -> dict[str, dict]:
    """``{script: {"image": [s, ...], "text": [...], "rows": {row: [s, ...]}, "untimed": [run, ...],
    "linked": n, "unfinished": n}}`` over every script's folder, or only those of ``scripts``."""
    if not runs.is_dir():
        raise UsageError(f"{runs} is not a folder of runs")
    costs = {}
    for script_dir in sorted(runs.glob(f"*-{scale}")):
        if not script_dir.is_dir() or script_dir.name.startswith("."):  # .shared-<scale>: the index of shared rows
            continue
        if scripts is not None and script_dir.name[: -len(scale) - 1] not in scripts:
            continue
        entry = {"image": [], "text": [], "rows": {}, "untimed": [], "linked": 0, "unfinished": 0}
        for run in sorted(script_dir.glob("*/seed*")):
            if run.is_symlink():
                entry["linked"] += 1
                continue
            if not run.is_dir():
                continue  # a run's log file beside its folder
            kind, seconds = run_seconds(run)
            if not kind:
                entry["unfinished"] += 1
            elif seconds is None:
                entry["untimed"].append(str(run))
            else:
                entry[kind].append(float(seconds))
                entry["rows"].setdefault(run.parent.name, []).append(float(seconds))
        costs[script_dir.name.removesuffix(f"-{scale}")] = entry
    if not costs:
        raise UsageError(f"no <script>-{scale} folders in {runs}")
    return costs


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h"


def report(costs: dict[str, dict], jobs: int) -> str:
    lines = ["| script | image runs | text runs | run-seconds | linked (counted elsewhere) | unfinished | untimed |",
             "|---|---|---|---|---|---|---|"]
    total = {"image": [], "text": []}
    for script, entry in costs.items():
        seconds = sum(entry["image"]) + sum(entry["text"])
        lines.append(f"| {script} | {len(entry['image'])} | {len(entry['text'])} | {seconds:.0f} "
                     f"({_hours(seconds)}) | {entry['linked']} | {entry['unfinished']} | {len(entry['untimed'])} |")
        total["image"] += entry["image"]
        total["text"] += entry["text"]
    image, text = sum(total["image"]), sum(total["text"])
    fastest = sum(min(times) * len(times) for entry in costs.values() for times in entry["rows"].values())
    lines += ["", f"Image runs: {len(total['image'])}, {image:.0f} run-seconds "
                  f"(mean {image / max(len(total['image']), 1):.0f} s); text runs: {len(total['text'])}, "
                  f"{text:.0f} run-seconds (mean {text / max(len(total['text']), 1):.0f} s).",
              f"All, as recorded: {image + text:.0f} run-seconds = {_hours(image + text)}; with {jobs} run(s) at "
              f"once, about {_hours((image + text) / jobs)} of wall time.",
              f"All, from each row's fastest run (a lower bound): {fastest:.0f} run-seconds = {_hours(fastest)}; "
              f"with {jobs} run(s) at once, about {_hours(fastest / jobs)} of wall time."]
    lines += ["", "| script | row | runs | s per run: fastest | median | slowest |", "|---|---|---|---|---|---|"]
    lines += [f"| {script} | {row} | {len(times)} | {min(times):.0f} | {statistics.median(times):.0f} | {max(times):.0f} |"
              for script, entry in costs.items() for row, times in entry["rows"].items()]
    untimed = [run for entry in costs.values() for run in entry["untimed"]]
    if untimed:
        lines.append(f"Finished without a recorded time (not in the sums): {', '.join(untimed)}")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("results/runs"), help="the runs root (RUNS_ROOT)")
    parser.add_argument("--scale", default="mini", help="the scale suffix of the script folders (mini, gpu, full)")
    parser.add_argument("--jobs", type=int, default=2, help="runs that ran at once (JOBS)")
    parser.add_argument("--scripts", nargs="+", default=None,
                        help="only these scripts' runs (default: every <script>-<scale> folder)")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
        text = report(suite_costs(args.runs, args.scale, args.scripts), args.jobs)
        print(text, end="")
        if args.output is not None:
            scripts = "" if args.scripts is None else " --scripts " + " ".join(args.scripts)
            atomic_write(args.output, f"# python scripts/suite_cost.py --runs {args.runs} --scale {args.scale} "
                                      f"--jobs {args.jobs}{scripts}\n\n{text}", parents=True)
    except (UsageError, WriteError) as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
