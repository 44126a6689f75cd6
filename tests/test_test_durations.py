"""scripts/test_durations.py: the suite's time in two checkouts, over the tests both hold and apart."""
import subprocess
import sys
from pathlib import Path

import test_durations

REPO = Path(__file__).resolve().parents[1]

BEFORE = """\
============================= slowest durations ==============================
10.00s call     tests/test_a.py::test_one
1.00s setup    tests/test_a.py::test_one
4.00s call     tests/test_b.py::test_two[x]
2.50s call     tests/test_a.py::test_removed
(12 durations < 0.005s hidden.  Use -vv to show these durations.)
3 passed in 18.00s
"""
AFTER = """\
8.00s call     tests/test_a.py::test_one
0.50s teardown tests/test_a.py::test_one
6.00s call     tests/test_b.py::test_two[x]
7.00s call     tests/test_c.py::test_new
3 passed in 22.00s
"""


def test_shared_tests_compared_and_the_others_apart(tmp_path, capsys):
    (tmp_path / "b.txt").write_text(BEFORE)
    (tmp_path / "a.txt").write_text(AFTER)
    output = tmp_path / "report.md"
    assert test_durations.main([str(tmp_path / "b.txt"), str(tmp_path / "a.txt"), "--names", "old", "new",
                                "--output", str(output)]) == 0
    report = capsys.readouterr().out
    assert report == output.read_text()
    assert report.startswith("Tests timed: old 3, new 3, in both 2.\n")
    assert "| in both runs | 15 s | 14 s | 0.967 |" in report       # (10 + 1 + 4) -> (8 + 0.5 + 6)
    assert "| all | 18 s | 22 s | 1.229 |" in report                  # 17.5 -> 21.5
    assert "| tests/test_b.py | 4.0 | 6.0 | +2.0 |\n| tests/test_a.py | 11.0 | 8.5 | -2.5 |" in report
    assert "Tests only old holds: 1, 2 s\n\n- tests/test_a.py: 2.5 s" in report
    assert "Tests only new holds: 1, 7 s\n\n- tests/test_c.py: 7.0 s" in report


def test_runs_without_shared_tests_have_no_ratio(tmp_path, capsys):
    """No test in both runs: the shared tests' ratio is "-", not a division by zero."""
    (tmp_path / "b.txt").write_text("1.00s call     tests/test_a.py::test_old\n")
    (tmp_path / "a.txt").write_text("2.00s call     tests/test_a.py::test_new\n")
    assert test_durations.main([str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]) == 0
    report = capsys.readouterr().out
    assert "| in both runs | 0 s | 0 s | - |" in report and "| all | 1 s | 2 s | 2.000 |" in report


def test_bad_input_is_one_error_line(tmp_path):
    (tmp_path / "empty.txt").write_text("3 passed in 1.00s\n")
    for args, message in (([str(tmp_path / "missing.txt"), str(tmp_path / "empty.txt")], "No such file"),
                          ([str(tmp_path / "empty.txt"), str(tmp_path / "empty.txt")],
                           f"error: {tmp_path / 'empty.txt'} holds no test durations (run pytest with --durations=0)"),
                          ([str(tmp_path / "empty.txt"), "--names", "a"],
                           "error: argument --names: expected 2 arguments")):
        result = subprocess.run([sys.executable, str(REPO / "scripts" / "test_durations.py"), *args],
                                capture_output=True, text=True)
        assert result.returncode == 2
        assert result.stdout == ""
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ") and message in result.stderr
