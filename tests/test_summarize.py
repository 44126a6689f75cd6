"""scripts/summarize.py on synthetic run folders: means, standard deviations, paired t-intervals,
GLUE task scores (MNLI matched + mismatched) and averages, and bad input."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

import summarize

REPO = Path(__file__).resolve().parents[1]


def write_dyconv(run: Path, top1: float, seed: int, top5: float = 99.0) -> None:
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "top1": top1, "top5": top5, "dynamic_ratio": 0.3, "params_dense": 1_000_000, "params_compact": 500_000,
        "arch": "resnet10", "conv": "dyconv", "pad": True, "epochs": 2, "seed": seed}))


def write_glue(run: Path, **metrics) -> None:
    run.mkdir(parents=True)
    results = {f"eval_{k}": v for k, v in metrics.items()}
    results.update(moe="pad", dynamic_ratio=0.5, ffn_params_dense=100_000, ffn_params_compact=60_000,
                   train_loss=0.5, eval_loss=0.7, eval_samples=10)
    (run / "all_results.json").write_text(json.dumps(results))


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "summarize.py"), *map(str, args)],
                          capture_output=True, text=True)


PAD = [72.5, 70.0, 74.25]
DYN = [71.0, 70.5, 72.0]
STATIC = [70.0, 69.0, 71.5]


@pytest.fixture
def dyconv_rows(tmp_path) -> Path:
    for name, values in (("pad", PAD), ("dyconv", DYN), ("static", STATIC)):
        for k, v in enumerate(values):
            write_dyconv(tmp_path / name / f"seed{k}", v, k)
    return tmp_path


def test_row_mean_std_and_paired_interval(dyconv_rows):
    pad = summarize.load_row(dyconv_rows / "pad", 3)
    dyn = summarize.load_row(dyconv_rows / "dyconv", 3)
    assert pad.seeds == [0, 1, 2] and pad.score == PAD
    mean, std = summarize.mean_std(pad.score)
    assert mean == pytest.approx(statistics.mean(PAD)) and std == pytest.approx(statistics.stdev(PAD))
    c = summarize.compare(pad, dyn)
    diffs = [a - b for a, b in zip(PAD, DYN)]
    assert c.differences == pytest.approx(diffs)
    expected = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert c.interval == pytest.approx((expected.low, expected.high))


def test_cli_table_and_comparisons(dyconv_rows, tmp_path):
    out = tmp_path / "table.md"
    result = run_cli(dyconv_rows / "pad", dyconv_rows / "dyconv", dyconv_rows / "static", "--seeds", 3,
                     "--compare", "pad", "dyconv", "--compare", "dyconv", "static", "--title", "T",
                     "--command", "bash x.sh", "--output", out)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert text.startswith("## T\n\nProduced by `bash x.sh`.")
    assert f"| pad | {statistics.mean(PAD):.2f} ± {statistics.stdev(PAD):.2f} (3) |" in text
    for a, b in ((PAD, DYN), (DYN, STATIC)):
        diffs = [x - y for x, y in zip(a, b)]
        ci = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
        assert f"{statistics.mean(diffs):.2f} ± {statistics.stdev(diffs):.2f} (3) | [{ci.low:.2f}, {ci.high:.2f}]" in text
    assert "| pad - dyconv |" in text and "| dyconv - static |" in text
    assert text.strip() in result.stdout.replace("\nT\n\n", "## T\n\nProduced by `bash x.sh`.\n\n", 1)


def test_glue_task_scores_mnli_mismatched_and_average(tmp_path):
    tasks = {  # per seed: the metrics run_glue writes (moe/glue.py names, _mm for MNLI-mismatched)
        "cola": [dict(matthews_correlation=0.40), dict(matthews_correlation=0.50)],
        "mrpc": [dict(accuracy=0.80, f1=0.86), dict(accuracy=0.78, f1=0.84)],
        "stsb": [dict(pearson=0.85, spearmanr=0.83), dict(pearson=0.87, spearmanr=0.86)],
        "mnli": [dict(accuracy=0.80, accuracy_mm=0.81), dict(accuracy=0.82, accuracy_mm=0.80)],
        "rte": [dict(accuracy=0.60), dict(accuracy=0.64)],
    }
    for task, seeds in tasks.items():
        for k, metrics in enumerate(seeds):
            write_glue(tmp_path / task / f"seed{k}", **metrics)
    rows = {task: summarize.load_row(tmp_path / task, 2) for task in tasks}
    task_scores = {task: [100 * statistics.mean(m.values()) for m in seeds] for task, seeds in tasks.items()}
    for task in tasks:
        assert rows[task].score == pytest.approx(task_scores[task])
    assert rows["mnli"].metrics["acc-mm"] == pytest.approx([81.0, 80.0])
    assert rows["mnli"].metrics["acc"] == pytest.approx([80.0, 82.0])
    avg = summarize.average_row("avg", list(rows.values()))
    per_seed = [statistics.mean(task_scores[t][k] for t in tasks) for k in range(2)]
    assert avg.score == pytest.approx(per_seed)

    out = tmp_path / "glue.md"
    result = run_cli(*(tmp_path / t for t in tasks), "--seeds", 2, "--average", "avg", *tasks, "--output", out)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    for column in ("MCC", "acc", "acc-mm", "F1", "Pearson", "Spearman", "task score"):
        assert f" {column} |" in text.splitlines()[2]
    assert "| mnli | - | 81.00 ± 1.41 (2) | 80.50 ± 0.71 (2) | - | - | - | 80.75 ± 0.35 (2) |" in text
    assert f"seed0: {per_seed[0]:.2f}, seed1: {per_seed[1]:.2f}" in text
    assert f"{statistics.mean(per_seed):.2f} ± {statistics.stdev(per_seed):.2f} (2)" in text


def test_single_seed_has_no_interval(tmp_path):
    write_dyconv(tmp_path / "a", 71.0, 0)
    write_dyconv(tmp_path / "b", 70.0, 0)
    result = run_cli(tmp_path / "a", tmp_path / "b", "--compare", "a", "b")
    assert result.returncode == 0, result.stderr
    assert "| a - b | 1.00 (1) | - (one seed) | +1.00 |" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--seeds", 3], "error: row pad: 1 of 3 runs missing or unfinished: {root}/pad/seed2"),
    (["--seeds", 2, "--compare", "pad", "nope"], "error: --compare pad nope: unknown row(s) nope"),
    (["--seeds", 2, "--average", "avg", "pad"], "error: --average avg: only GLUE rows can be averaged"),
    (["--seeds", 0], "error: --seeds must be >= 1, got 0"),
])
def test_bad_input_is_one_error_line(tmp_path, args, message):
    for k in range(2):
        write_dyconv(tmp_path / "pad" / f"seed{k}", 70.0 + k, k)
    result = run_cli(tmp_path / "pad", *args)
    assert result.returncode == 2
    assert result.stderr == message.format(root=tmp_path) + "\n"


def test_unreadable_and_unfinished_runs(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{not json")
    result = run_cli(tmp_path / "broken")
    assert result.returncode == 2 and result.stderr == f"error: {tmp_path}/broken/summary.json line 1: not valid JSON (Expecting property name enclosed in double quotes)\n"
    (tmp_path / "empty").mkdir()
    result = run_cli(tmp_path / "empty")
    assert result.returncode == 2
    assert result.stderr == f"error: row empty: 1 of 1 runs missing or unfinished: {tmp_path}/empty\n"


def test_seeds_that_do_not_pair(tmp_path):
    write_dyconv(tmp_path / "a", 71.0, 0)
    write_dyconv(tmp_path / "b", 70.0, 1)
    result = run_cli(tmp_path / "a", tmp_path / "b", "--compare", "a", "b")
    assert result.returncode == 2
    assert result.stderr == "error: compare a b: seeds [0] and [1] do not pair up\n"


def test_machine_and_commit_lines_count_runs_per_recorded_value(tmp_path):
    """Each run's recorded machine and commit are counted; runs written before the records say so."""
    records = [("cpu: A (2 cores, 1 torch threads), torch 2", "abc1234"),
               ("cpu: A (2 cores, 1 torch threads), torch 2", "def5678+modified"), (None, None)]
    for k, (machine, commit) in enumerate(records):
        write_dyconv(tmp_path / "row" / f"seed{k}", 70.0 + k, k)
        if machine is not None:
            path = tmp_path / "row" / f"seed{k}" / "summary.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "machine": machine, "commit": commit}))
    result = run_cli(tmp_path / "row", "--seeds", 3, "--output", tmp_path / "t.md")
    assert result.returncode == 0, result.stderr
    for line in ("Machine: cpu: A (2 cores, 1 torch threads), torch 2 (2 runs); not recorded (1 run)",
                 "Commit: abc1234 (1 run); def5678+modified (1 run); not recorded (1 run)"):
        assert line in result.stdout and line in (tmp_path / "t.md").read_text()


def test_code_version_is_this_checkout_commit():
    from pad.runtime import code_version
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        assert code_version() == "unknown"
    else:
        assert code_version().split("+")[0] == head.stdout.strip()


def test_machine_description_names_the_device_and_torch():
    import torch

    from pad.runtime import machine_description
    text = machine_description()
    assert text.startswith("cuda: " if torch.cuda.is_available() else "cpu: ")
    assert text.endswith(f"torch {torch.__version__}")
    if not torch.cuda.is_available():
        assert f"{torch.get_num_threads()} torch threads" in text
