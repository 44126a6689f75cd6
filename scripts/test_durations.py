#!/usr/bin/env python
"""Compares the test suite's time between two checkouts, test by test.

    python -m pytest -n 0 --durations=0 tests > before.txt     (in each checkout, same machine, same load)
    python scripts/test_durations.py before.txt after.txt [--output table.md]

Each file is pytest's output with ``--durations=0``. A test's time is its setup + call + teardown. The
comparison that says whether a change made the suite slower is over the tests both runs hold (same id);
tests only one run holds are totalled apart, per file. Pytest hides durations under 5 ms, so a test that
fast counts as 0. Bad input: one ``error:`` line, exit status 2.
"""
from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

from pad.runtime import OneLineParser, UsageError, atomic_write, report_error

DURATION = re.compile(r"^([0-9.]+)s (?:setup|call|teardown)\s+(\S+)")


def read_durations(path: Path) -> Counter:
    """Test id -> seconds (setup + call + teardown) from a ``pytest --durations=0`` output."""
    times = Counter()
    for line in path.read_text().splitlines():
        match = DURATION.match(line)
        if match:
            times[match.group(2)] += float(match.group(1))
    if not times:
        raise ValueError(f"{path} holds no test durations (run pytest with --durations=0)")
    return times


def per_file(times: Counter, ids) -> Counter:
    totals = Counter()
    for test in ids:
        totals[test.split("::")[0]] += times[test]
    return totals


def ratio(after: float, before: float) -> str:
    """``after / before`` to 3 decimals, or "-" where the baseline took no measurable time."""
    return f"{after / before:.3f}" if before > 0 else "-"


def compare(before: Counter, after: Counter, names: tuple[str, str]) -> str:
    """The markdown report: shared tests' totals and ratio, per-file differences, tests only one run holds."""
    shared = set(before) & set(after)
    only_before, only_after = set(before) - shared, set(after) - shared
    shared_before, shared_after = (sum(times[t] for t in shared) for times in (before, after))
    lines = [f"Tests timed: {names[0]} {len(before)}, {names[1]} {len(after)}, in both {len(shared)}.", "",
             "| tests | " + " | ".join(names) + " | ratio |", "|---|---|---|---|",
             f"| in both runs | {shared_before:.0f} s | {shared_after:.0f} s | {ratio(shared_after, shared_before)} |",
             f"| all | {sum(before.values()):.0f} s | {sum(after.values()):.0f} s | "
             f"{ratio(sum(after.values()), sum(before.values()))} |", "",
             "Per file, the tests in both runs:", "", "| file | " + " | ".join(names) + " | difference |",
             "|---|---|---|---|"]
    files_before, files_after = per_file(before, shared), per_file(after, shared)
    for name in sorted(files_before, key=lambda f: files_after[f] - files_before[f], reverse=True):
        lines.append(f"| {name} | {files_before[name]:.1f} | {files_after[name]:.1f} | "
                     f"{files_after[name] - files_before[name]:+.1f} |")
    for label, times, ids in ((names[0], before, only_before), (names[1], after, only_after)):
        lines += ["", f"Tests only {label} holds: {len(ids)}, {sum(times[t] for t in ids):.0f} s", ""]
        lines += [f"- {name}: {seconds:.1f} s" for name, seconds in per_file(times, ids).most_common()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="pytest --durations=0 output of the baseline checkout")
    parser.add_argument("after", type=Path, help="pytest --durations=0 output of the changed checkout")
    parser.add_argument("--names", nargs=2, default=("before", "after"), help="column names of the two runs")
    parser.add_argument("--output", type=Path, help="also write the report here")
    try:
        args = parser.parse_args(argv)
        report = compare(read_durations(args.before), read_durations(args.after), tuple(args.names))
        if args.output:
            atomic_write(args.output, report)
    except (UsageError, OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        return report_error(err)
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
