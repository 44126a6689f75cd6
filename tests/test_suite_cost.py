"""scripts/suite_cost.py: the run-seconds a suite cost, from the runs' records, each run counted once."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import suite_cost

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    write(root / "table-mini" / "img" / "seed0" / "summary.json", {"wall_seconds": 100.0})
    write(root / "table-mini" / "img" / "seed1" / "summary.json", {"wall_seconds": 300.0})
    (root / "table-mini" / "img" / "seed1.log").write_text("a run's log beside its folder")
    write(root / "table-mini" / "txt" / "seed0" / "all_results.json", {"train_runtime": 50.0, "eval_runtime": 10.0})
    (root / "table-mini" / "txt" / "seed1").mkdir()  # unfinished
    write(root / "ablation-mini" / "old" / "seed0" / "summary.json", {"top1": 90.0})  # finished, no time recorded
    (root / "ablation-mini" / "img").mkdir(parents=True)
    (root / "ablation-mini" / "img" / "seed0").symlink_to(root / "table-mini" / "img" / "seed0")
    write(root / ".shared-mini" / "0123", {"not": "a run"})
    write(root / "table-full" / "img" / "seed0" / "summary.json", {"wall_seconds": 9999.0})  # another scale
    return root


def test_each_run_counted_once_with_both_bounds(runs, capsys):
    output = runs.parent / "cost.md"
    assert suite_cost.main(["--runs", str(runs), "--scale", "mini", "--jobs", "2", "--output", str(output)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[2] == "| ablation | 0 | 0 | 0 (0.00 h) | 1 | 0 | 1 |"
    assert lines[3] == "| table | 2 | 1 | 460 (0.13 h) | 0 | 1 | 0 |"
    assert "Image runs: 2, 400 run-seconds (mean 200 s); text runs: 1, 60 run-seconds (mean 60 s)." in lines
    # as recorded: 460 s, over 2 jobs 230 s; the fastest run of each row: 2 x 100 + 60 = 260 s
    assert "All, as recorded: 460 run-seconds = 0.13 h; with 2 run(s) at once, about 0.06 h of wall time." in lines
    assert ("All, from each row's fastest run (a lower bound): 260 run-seconds = 0.07 h; with 2 run(s) at once, "
            "about 0.04 h of wall time.") in lines
    assert "| table | img | 2 | 100 | 200 | 300 |" in lines
    assert "| table | txt | 1 | 60 | 60 | 60 |" in lines
    assert lines[-1] == f"Finished without a recorded time (not in the sums): {runs / 'ablation-mini' / 'old' / 'seed0'}"
    assert output.read_text() == f"# python scripts/suite_cost.py --runs {runs} --scale mini --jobs 2\n\n{text}"


def test_scripts_limits_the_count_to_those_scripts(runs, capsys):
    output = runs.parent / "cost.md"
    assert suite_cost.main(["--runs", str(runs), "--scripts", "table", "--output", str(output)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| table | 2 | 1 | 460 (0.13 h) | 0 | 1 | 0 |" and not any("ablation" in l for l in lines)
    assert output.read_text().startswith(f"# python scripts/suite_cost.py --runs {runs} --scale mini --jobs 2 "
                                         f"--scripts table\n")


@pytest.mark.parametrize("args, message", [
    (["--runs", "{root}/missing"], "error: {root}/missing is not a folder of runs"),
    (["--runs", "{root}", "--scale", "gpu"], "error: no <script>-gpu folders in {root}"),
    (["--runs", "{root}", "--jobs", "0"], "error: --jobs must be >= 1, got 0"),
    (["--runs", "{root}", "--jobs", "two"], "error: argument --jobs: invalid int value: 'two'"),
    (["--runs", "{root}", "--scale", "bad"], "error: {root}/bad-bad/row/seed0/summary.json: empty file, "
                                             "expected JSON"),
])
def test_bad_input_is_one_error_line(tmp_path, args, message):
    root = tmp_path / "runs"
    write(root / "a-mini" / "row" / "seed0" / "summary.json", {"wall_seconds": 1.0})
    (root / "bad-bad" / "row" / "seed0").mkdir(parents=True)
    (root / "bad-bad" / "row" / "seed0" / "summary.json").write_text("")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "suite_cost.py"),
                             *(a.format(root=root) for a in args)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == message.format(root=root) + "\n"
