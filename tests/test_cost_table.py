"""scripts/cost_table.py: stored parameters, mask bits and seconds per training step over seeds."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import cost_table

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_means_and_spreads_over_seeds(tmp_path, capsys):
    for seed, (params, seconds) in enumerate([(100, 0.5), (100, 0.7)]):
        write(tmp_path / "r-pad0.3-unit" / f"seed{seed}" / "summary.json",
              {"params_compact": params, "mask_entries": 48, "train_seconds_per_step": seconds, "top1": 50})
        write(tmp_path / "rte-pad-unit" / f"seed{seed}" / "all_results.json",
              {"ffn_params_compact": 2000 + seed * 2, "train_steps_per_second": 2.0 + 2 * seed})
    output = tmp_path / "table.md"
    output.write_text("accuracy table\n")
    code = cost_table.main([str(tmp_path / "r-pad0.3-unit"), str(tmp_path / "rte-pad-unit"), "--seeds", "2",
                            "--output", str(output), "--title", "Costs"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "### Costs"
    assert lines[4] == "| r-pad0.3-unit | 100 ± 0 (2) | 48 ± 0 (2) | 0.6 ± 0.1414 (2) |"
    # 1 / steps per second: 0.5 and 0.25 s per step; no mask bits recorded: "-"
    assert lines[5] == "| rte-pad-unit | 2001 ± 1 (2) | - | 0.375 ± 0.1768 (2) |"
    assert output.read_text().startswith("accuracy table\n\n### Costs\n")


def test_missing_run_is_one_error_line(tmp_path):
    write(tmp_path / "row" / "seed0" / "summary.json", {"params_compact": 1})
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "cost_table.py"), str(tmp_path / "row"),
                             "--seeds", "2"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == (f"error: {tmp_path / 'row' / 'seed1'} holds neither summary.json nor all_results.json: "
                             "did the run finish?\n")


@pytest.mark.parametrize("case, message", [
    ("not_a_number", "train_seconds_per_step is not a number ('fast')"),
    ("output_is_a_folder", "cannot write"),
    ("bad_flag", "error: argument --seeds: invalid int value: 'two'"),
])
def test_bad_input_is_one_error_line(tmp_path, case, message):
    write(tmp_path / "row" / "seed0" / "summary.json",
          {"params_compact": 1, "train_seconds_per_step": "fast" if case == "not_a_number" else 0.5})
    (tmp_path / "out.md").mkdir()
    args = [str(tmp_path / "row"), "--seeds", "two" if case == "bad_flag" else "1"]
    args += ["--output", str(tmp_path / "out.md")] if case == "output_is_a_folder" else []
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "cost_table.py"), *args], capture_output=True,
                            text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr, result.stderr
