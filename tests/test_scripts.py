"""The table and ablation scripts (scripts/lib.sh): flags, seeds, skipping finished runs, declared
comparisons, and --smoke: every full-scale row with its real config for one step on generated tiny data
(a 1000-class ImageNet-layout folder of JPEGs, GLUE TSVs of the nine tasks)."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# The rows each script runs, at full scale (and --smoke) and with --mini.
FULL_ARCHS = ["resnet10", "resnet18", "resnet50", "mobilenetv2_050", "mobilenetv2_075", "mobilenetv2_100"]
GLUE_TASKS = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]


def table1_rows(archs):
    return [f"{a}-{v}" for a in archs for v in ("static", "dyconv", "dyconv-pad0.3")]


def table2_rows(tasks):
    return [f"{t}-{m}" for t in tasks for m in ("none", "moe", "pad")]


def dynamic_convs_rows(arch):
    """PAD-ODConv's rows name their static attention: channel-filter (the default) and the ablations none, all."""
    return ([f"{arch}-{c}{p}" for c in ("condconv", "dyconv") for p in ("", "-pad0.3")]
            + [f"{arch}-odconv"] + [f"{arch}-odconv-pad0.3-{a}" for a in ("channel-filter", "none", "all")])


def ratio_rows(arch, text_ratios=("0.3", "0.5", "0.7", "0.9")):
    """The text sweep is the paper's MoE one, except at --protocol: the sweep the selection note fixed."""
    return [f"{arch}-pad{r}" for r in ("0.1", "0.3", "0.5", "0.7", "1.0")] + [f"rte-pad{r}" for r in text_ratios]


PROTOCOL_TEXT_RATIOS = ("0.1", "0.3", "0.5", "0.7", "1.0")
PROTOCOL_TEXT_PARTITION_ROWS = ["rte-pad-taylor", "rte-pad-random", "rte-pad-oneshot"]


def partition_rows(arch):
    return ([f"{arch}-pad0.3-{c}" for c in ("taylor", "random", "magnitude", "grasp", "synflow")]
            + [f"{arch}-pad0.3-taylor-{v}" for v in ("local", "linear", "oneshot")])


def scale_rows(arch):
    return [f"{p}-scale-{v}" for v in ("both", "s", "d", "none") for p in (f"{arch}-pad0.3", "rte-pad")]


MOE_LAYER_ROWS = [f"rte-{m}-{l}" for l in ("intermediate", "output", "both") for m in ("moe", "pad")]

SCRIPTS = {  # script: (full-scale rows, mini rows)
    "table1_imagenet_dyconv": (table1_rows(FULL_ARCHS), table1_rows(["resnet10", "mobilenetv2_050"])),
    "table2_glue_moe": (table2_rows(GLUE_TASKS), table2_rows(["sst2", "rte"])),
    "table_dynamic_convs": (dynamic_convs_rows("resnet50"), dynamic_convs_rows("resnet10")),
    "ablation_dynamic_ratio": (ratio_rows("resnet50"), ratio_rows("resnet10")),
    "ablation_partition": (partition_rows("resnet50"), partition_rows("resnet10")),
    "ablation_scale_factors": (scale_rows("resnet50"), scale_rows("resnet10")),
    "ablation_moe_layers": (MOE_LAYER_ROWS, MOE_LAYER_ROWS),
    "ablation_granularity": tuple([f"{a}-pad0.3-{g}" for g in ("element", "kernel", "unit")] + ["rte-pad-element", "rte-pad-unit"] for a in ("resnet50", "resnet10")),
}


def run_script(name, *args, env=None, timeout=None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(["bash", str(REPO / "scripts" / f"{name}.sh"), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)


RUN_STARTS = re.compile(r"^== \S+: \S+ seed \d+$")  # what lib.sh prints as a run starts


def run_finished(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Runs a table script or the suite over runs that are all finished. If it starts a run anyway (a row the
    fake runs miss), the test fails at once, with that row, instead of training it for minutes."""
    stdout = []
    with tempfile.TemporaryFile("w+") as stderr, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **env}) as process:
        for line in process.stdout:
            stdout.append(line)
            if RUN_STARTS.match(line.rstrip("\n")):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                pytest.fail(f"a run started, though every run was finished: {line.strip()}")
        process.wait()
        stderr.seek(0)
        return subprocess.CompletedProcess(command, process.returncode, "".join(stdout), stderr.read())


def run_finished_script(name, *args, env) -> subprocess.CompletedProcess:
    return run_finished(["bash", str(REPO / "scripts" / f"{name}.sh"), *args], env)


def is_glue_row(row: str) -> bool:
    return row.split("-")[0] in GLUE_TASKS


def fake_run(run: Path, row: str, seed: int) -> float:
    """A finished run of ``row``: summary.json (dyconv) or all_results.json (GLUE); returns its score."""
    run.mkdir(parents=True)
    score = 60.0 + (hash(row) % 100) / 10 + seed
    if is_glue_row(row):
        (run / "all_results.json").write_text(json.dumps({"eval_accuracy": score / 100, "dynamic_ratio": 0.5}))
    else:
        (run / "summary.json").write_text(json.dumps({"top1": score, "top5": 99.0, "dynamic_ratio": 0.3,
                                                      "seed": seed}))
    return score


# ---------------------------------------------------------------- flags

@pytest.mark.parametrize("args, env, message", [
    (["--bogus"], {}, "error: unknown argument --bogus (expected --mini, --gpu, --protocol, --smoke, --seeds N, --jobs N, --pipeline P)"),
    (["--gpu", "--mini"], {}, "error: --mini and --gpu exclude each other"),
    (["--smoke", "--gpu"], {}, "error: --gpu and --smoke exclude each other"),
    (["--mini", "--jobs", "0"], {}, "error: the number of jobs must be a positive integer, got '0'"),
    (["--mini"], {"JOBS": "x"}, "error: the number of jobs must be a positive integer, got 'x'"),
    (["--mini", "--smoke"], {}, "error: --mini and --smoke exclude each other"),
    (["--mini", "--seeds", "0"], {}, "error: the number of seeds must be a positive integer, got '0'"),
    (["--mini"], {"SEEDS": "two"}, "error: the number of seeds must be a positive integer, got 'two'"),
    (["--mini", "--seeds"], {}, "error: --seeds needs a number"),
    (["--mini", "--pipeline", "images"], {}, "error: the pipeline must be dyconv, glue or all, got 'images'"),
    (["--mini"], {"PIPELINE": "moe"}, "error: the pipeline must be dyconv, glue or all, got 'moe'"),
    (["--mini", "--pipeline"], {}, "error: --pipeline needs dyconv, glue or all"),
])
def test_bad_flags_are_one_error_line(args, env, message):
    result = run_script("table_dynamic_convs", *args, env=env)
    assert result.returncode == 2
    assert result.stderr == message + "\n"


@pytest.mark.parametrize("gpu_seen, args, suffix", [
    (False, [], ""),
    (True, [], "-cuda"),  # the benchmarks default to CUDA where torch sees it
    (True, ["--device", "cpu"], ""),
    (True, ["--device=cpu", "--amp"], "-amp"),
    (False, ["--sizes", "112", "--device", "cuda", "--amp"], "-cuda-amp"),
    (False, ["--device=cuda", "--layers"], "-cuda-layers"),
    (False, ["--layers", "--compile", "inductor", "--amp"], "-amp-compile-layers"),
])
def test_benchmark_output_names(tmp_path, gpu_seen, args, suffix):
    """A GPU, AMP, compiled or per-layer benchmark never writes over the plain CPU table."""
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\nexit {0 if gpu_seen else 1}\n")
    fake_python.chmod(0o755)
    result = subprocess.run(["bash", "-c", 'source scripts/flags.sh; output_suffix "$@"', "-", str(fake_python), *args],
                            capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout == suffix + "\n"


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_mini_rows_per_seed_finished_runs_skipped_and_compared(tmp_path, script):
    """Every row x seed already finished: nothing trains, and the table has every row over 2 seeds."""
    rows = SCRIPTS[script][1]
    runs, results = tmp_path / "runs", tmp_path / "results"
    for row in rows:
        for seed in range(2):
            fake_run(runs / row / f"seed{seed}", row, seed)
    result = run_finished_script(script, "--mini", "--seeds", "2", env={"RUNS": str(runs), "RESULTS": str(results)})
    assert result.returncode == 0, result.stderr
    assert "== " not in result.stdout  # no run started or linked
    table = (results / f"{script}-mini.md").read_text()
    assert f"Produced by `bash scripts/{script}.sh --mini --seeds 2`." in table
    for row in rows:
        assert f"| {row} | " in table and " (2) |" in table
    compared = [l.split(" | ")[0].lstrip("| ") for l in table.splitlines()
                if l.startswith("| ") and " - " in l.split(" | ")[0]]
    assert compared == MINI_COMPARISONS[script]


def test_gpu_scale_rows_table_and_cuda_check(tmp_path):
    """--gpu: table1's ResNet-10 rows in runs/<script>-gpu, a -gpu table (finished runs need no GPU), and a
    run that would train needs CUDA: one error line, nothing trained."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    rows = table1_rows(["resnet10"])
    for row in rows:
        for seed in range(2):
            fake_run(runs / "table1_imagenet_dyconv-gpu" / row / f"seed{seed}", row, seed)
    env = {"RUNS_ROOT": str(runs), "RESULTS": str(results)}
    result = run_finished_script("table1_imagenet_dyconv", "--gpu", "--seeds", "2", "--pipeline", "dyconv", env=env)
    assert result.returncode == 0, result.stderr
    assert "== " not in result.stdout
    table = (results / "table1_imagenet_dyconv-gpu-dyconv.md").read_text()
    assert "Produced by `bash scripts/table1_imagenet_dyconv.sh --gpu --seeds 2 --pipeline dyconv`." in table
    assert [l.split(" | ")[0].lstrip("| ") for l in table.splitlines() if l.startswith("| resnet")
            and " - " not in l.split(" | ")[0]] == rows
    assert "mobilenet" not in table
    if not torch_cuda_available():
        result = run_script("table1_imagenet_dyconv", "--gpu", "--seeds", "3", "--pipeline", "dyconv", env=env)
        assert result.returncode == 2
        assert result.stderr == ("error: --gpu needs a CUDA device to train (torch.cuda.is_available() is False); "
                                 "use --mini on CPU\n")
        assert not (runs / "table1_imagenet_dyconv-gpu" / rows[0] / "seed2").exists()


def torch_cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


# The comparisons each --mini table makes, in order: a comparison declared before its rows ran is made too.
MINI_COMPARISONS = {
    "table1_imagenet_dyconv": [f"{a}-{x} - {a}-{y}" for a in ("resnet10", "mobilenetv2_050")
                               for x, y in (("dyconv-pad0.3", "dyconv"), ("dyconv", "static"), ("dyconv-pad0.3", "static"))],
    "table2_glue_moe": [f"{t}-{x} - {t}-{y}" for t in ("sst2", "rte") for x, y in (("pad", "moe"), ("moe", "none"))]
                       + ["average-pad - average-moe", "average-moe - average-none", "average-pad - average-none"],
    "table_dynamic_convs": [f"resnet10-{c}-pad0.3 - resnet10-{c}" for c in ("condconv", "dyconv")]
                           + ["resnet10-odconv-pad0.3-channel-filter - resnet10-odconv"]
                           + [f"resnet10-odconv-pad0.3-{a} - resnet10-odconv{p}" for a in ("none", "all")
                              for p in ("", "-pad0.3-channel-filter")],
    "ablation_dynamic_ratio": [f"resnet10-pad{r} - resnet10-pad0.3" for r in ("0.1", "0.5", "0.7", "1.0")]
                              + [f"rte-pad{r} - rte-pad0.5" for r in ("0.3", "0.7", "0.9")],
    "ablation_partition": [f"resnet10-pad0.3-{c} - resnet10-pad0.3-taylor"
                           for c in ("random", "magnitude", "grasp", "synflow", "taylor-local", "taylor-linear",
                                     "taylor-oneshot")],
    "ablation_scale_factors": [f"{p}-scale-{v} - {p}-scale-both" for v in ("s", "d", "none")
                               for p in ("resnet10-pad0.3", "rte-pad")],
    "ablation_moe_layers": [f"rte-pad-{l} - rte-moe-{l}" for l in ("intermediate", "output", "both")]
                           + [f"rte-{m}-{l} - rte-{m}-both" for m in ("moe", "pad") for l in ("intermediate", "output")],
    "ablation_granularity": [f"resnet10-pad0.3-{g} - resnet10-pad0.3-element" for g in ("kernel", "unit")]
                            + ["rte-pad-unit - rte-pad-element"],
}


def test_seeds_env_and_flag(tmp_path):
    """SEEDS=N sets the number of seeds; --seeds wins over it; a missing seed's run is attempted."""
    rows = SCRIPTS["ablation_moe_layers"][1]
    runs, results = tmp_path / "runs", tmp_path / "results"
    for row in rows:
        for seed in range(2):
            fake_run(runs / row / f"seed{seed}", row, seed)
    env = {"RUNS": str(runs), "RESULTS": str(results)}
    ok = run_script("ablation_moe_layers", "--mini", env={**env, "SEEDS": "2"})
    assert ok.returncode == 0, ok.stderr
    assert "--seeds 2`" in (results / "ablation_moe_layers-mini.md").read_text()
    ok = run_script("ablation_moe_layers", "--mini", "--seeds", "1", env={**env, "SEEDS": "3"})
    assert ok.returncode == 0, ok.stderr
    assert "| rte-pad-both - rte-moe-both | " in ok.stdout and "- (one seed)" in ok.stdout


@pytest.mark.parametrize("pipeline, via_env", [("dyconv", False), ("glue", True)])
def test_pipeline_runs_and_compares_only_its_rows(tmp_path, pipeline, via_env):
    """--pipeline (or PIPELINE=): only that pipeline's rows are run and tabled, with only the comparisons
    between them, in a table of its own; the other pipeline's missing runs are not attempted."""
    rows = SCRIPTS["ablation_scale_factors"][1]
    own = [r for r in rows if is_glue_row(r) == (pipeline == "glue")]
    runs, results = tmp_path / "runs", tmp_path / "results"
    for row in own:
        for seed in range(2):
            fake_run(runs / row / f"seed{seed}", row, seed)
    flags, env = (["--pipeline", pipeline], {}) if not via_env else ([], {"PIPELINE": pipeline})
    result = run_finished_script("ablation_scale_factors", "--mini", "--seeds", "2", *flags,
                                 env={"RUNS": str(runs), "RESULTS": str(results), **env})
    assert result.returncode == 0, result.stderr
    assert "== " not in result.stdout  # nothing started: the other pipeline's runs are missing and not run
    assert [p.name for p in results.iterdir()] == [f"ablation_scale_factors-mini-{pipeline}.md"]
    table = (results / f"ablation_scale_factors-mini-{pipeline}.md").read_text()
    assert f"`bash scripts/ablation_scale_factors.sh --mini --seeds 2 --pipeline {pipeline}`" in table
    for row in rows:
        assert (f"| {row} | " in table) == (row in own)
    compared = [l for l in table.splitlines() if l.startswith("| ") and " - " in l.split(" | ")[0]]
    assert len(compared) == 3 and all(l.split(" - ")[0].lstrip("| ") in own for l in compared)


def test_pipeline_of_a_script_without_its_rows(tmp_path):
    """A text-only script with --pipeline dyconv runs nothing and writes no table."""
    result = run_script("ablation_moe_layers", "--mini", "--pipeline", "dyconv",
                        env={"RUNS": str(tmp_path / "runs"), "RESULTS": str(tmp_path / "results")})
    assert result.returncode == 0, result.stderr
    assert "no dyconv rows; no table written" in result.stdout
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


def test_paired_differences_of_a_declared_comparison(tmp_path):
    """table_dynamic_convs compares PAD with the fully dynamic conv, seed by seed."""
    rows = SCRIPTS["table_dynamic_convs"][1]
    runs, results = tmp_path / "runs", tmp_path / "results"
    scores = {(row, s): fake_run(runs / row / f"seed{s}", row, s) for row in rows for s in range(3)}
    result = run_script("table_dynamic_convs", "--mini", env={"RUNS": str(runs), "RESULTS": str(results)})
    assert result.returncode == 0, result.stderr
    diffs = [scores["resnet10-odconv-pad0.3-channel-filter", s] - scores["resnet10-odconv", s] for s in range(3)]
    line = next(l for l in result.stdout.splitlines()
                if l.startswith("| resnet10-odconv-pad0.3-channel-filter - resnet10-odconv |"))
    assert ", ".join(f"{d:+.2f}" for d in diffs) in line
    assert "(3)" in line  # --mini defaults to 3 seeds


# ---------------------------------------------------------------- --smoke

def make_imagenet(root: Path, classes: int = 1000) -> Path:
    """``root/{train,val}/n<id>/*.JPEG``: one small random JPEG per class and split (1000 classes, as ImageNet)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{split}_{c}.JPEG")
    return root


def make_glue(root: Path, n: int = 8) -> Path:
    """The nine GLUE tasks in GLUE's TSV layouts (train and dev; MNLI dev matched and mismatched)."""
    rng = random.Random(0)
    words = "the movie film is was it and of to good bad".split()

    def s():
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))

    def tsv(path, header, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join("\t".join(map(str, r)) + "\n" for r in ([header] if header else []) + rows))

    nli = ["entailment", "not_entailment"]
    mnli = ["entailment", "neutral", "contradiction"]
    mnli_header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                   "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
    for split in ("train", "dev"):
        tsv(root / "CoLA" / f"{split}.tsv", None, [["src", i % 2, "", s()] for i in range(n)])
        tsv(root / "SST-2" / f"{split}.tsv", ["sentence", "label"], [[s(), i % 2] for i in range(n)])
        tsv(root / "MRPC" / f"{split}.tsv", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
            [[i % 2, i, i, s(), s()] for i in range(n)])
        tsv(root / "STS-B" / f"{split}.tsv", ["index", "genre", "filename", "year", "old_index", "source1", "source2",
                                              "sentence1", "sentence2", "score"],
            [[i, "g", "f", "y", i, "a", "b", s(), s(), f"{rng.uniform(0, 5):.2f}"] for i in range(n)])
        tsv(root / "QQP" / f"{split}.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            [[i, i, i, s(), s(), i % 2] for i in range(n)])
        tsv(root / "QNLI" / f"{split}.tsv", ["index", "question", "sentence", "label"],
            [[i, s(), s(), nli[i % 2]] for i in range(n)])
        tsv(root / "RTE" / f"{split}.tsv", ["index", "sentence1", "sentence2", "label"],
            [[i, s(), s(), nli[i % 2]] for i in range(n)])
        tsv(root / "WNLI" / f"{split}.tsv", ["index", "sentence1", "sentence2", "label"],
            [[i, s(), s(), i % 2] for i in range(n)])
    for split in ("train", "dev_matched", "dev_mismatched"):
        tsv(root / "MNLI" / f"{split}.tsv", mnli_header,
            [[i, i, i, "g", "", "", "", "", s(), s(), mnli[i % 3], mnli[i % 3]] for i in range(n)])
    return root


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("smoke_data")
    return {"IMAGENET": str(make_imagenet(root / "imagenet")), "GLUE_DIR": str(make_glue(root / "glue"))}


def test_parallel_runs_report_each_failure(tmp_path):
    """--jobs 2: every run that fails is named on its own error line with its log; the script exits 1."""
    (tmp_path / "imagenet").mkdir()
    runs = tmp_path / "runs"
    result = run_script("table_dynamic_convs", "--smoke", "--jobs", "2", env={
        "IMAGENET": str(tmp_path / "imagenet"), "GLUE_DIR": str(tmp_path), "RUNS": str(runs)})
    assert result.returncode == 1
    rows = SCRIPTS["table_dynamic_convs"][0]
    expected = sorted(f"error: run failed: {runs}/{row}/seed0 (exit 2, output in {runs}/{row}/seed0.log)" for row in rows)
    assert sorted(result.stderr.splitlines()) == expected
    for row in rows:
        assert (runs / row / "seed0.log").read_text().startswith("error: ")


def test_smoke_needs_its_data(tmp_path):
    result = run_script("table2_glue_moe", "--smoke", env={"IMAGENET": "", "GLUE_DIR": "", "RUNS": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr == "error: --smoke needs IMAGENET=a tiny ImageNet-layout folder (train/<class>/, val/<class>/)\n"
    result = run_script("table2_glue_moe", "--smoke", env={"IMAGENET": "x", "GLUE_DIR": "", "RUNS": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr == "error: --smoke needs GLUE_DIR=a tiny GLUE TSV folder (<TASK>/train.tsv, dev.tsv)\n"


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_smoke_runs_every_full_scale_row(tmp_path, smoke_data, script):
    """--smoke runs each full-scale row (real config: 224 px, 1000 classes; bert-base settings on MiniLM)
    for one step; every row writes its results and the summary lists it. One run at a time: the test workers
    (scripts/test.sh) already fill the cores, and two ResNet-50 runs per worker ran out of memory."""
    runs = tmp_path / "runs"
    result = run_script(script, "--smoke",
                        env={**smoke_data, "RUNS": str(runs), "RESULTS": str(tmp_path / "r")})
    logs = "".join(p.read_text()[-1500:] for p in runs.rglob("seed0.log"))
    assert result.returncode == 0, result.stderr[-3000:] + logs
    for row in SCRIPTS[script][0]:
        name = "all_results.json" if is_glue_row(row) else "summary.json"
        results = json.loads((runs / row / "seed0" / name).read_text())
        if not is_glue_row(row):
            assert (results["image_size"], results["num_classes"], results["dataset"]) == (224, 1000, "imagenet")
    summary = (runs / "summary.md").read_text()
    assert all(f"| {row} | " in summary for row in SCRIPTS[script][0])
    assert not list(runs.rglob("*.pt")) and not list(runs.rglob("*.safetensors"))  # no checkpoints written, weights dropped


# ---------------------------------------------------------------- the mini suite

def fake_suite(root: Path, seeds: int, scale: str = "mini") -> None:
    """Every --mini row of every script finished (in ``<script>-<scale>/``), with what the figures read: IMP's
    per-layer ratios for PAD rows and TensorBoard scale factors for the scale-factor rows."""
    from torch.utils.tensorboard import SummaryWriter
    for script, (_, rows) in SCRIPTS.items():
        if scale == "protocol" and script == "ablation_dynamic_ratio":
            rows = ratio_rows("resnet10", PROTOCOL_TEXT_RATIOS)
        if scale == "protocol" and script == "ablation_partition":
            rows = rows + PROTOCOL_TEXT_PARTITION_ROWS
        for row in rows:
            for seed in range(seeds):
                run = root / f"{script}-{scale}" / row / f"seed{seed}"
                fake_run(run, row, seed)
                if "pad" in row and is_glue_row(row):
                    (run / "partition.json").write_text(json.dumps({"per_layer": {"l0": 0.5, "l1": 0.5}}))
                elif "pad" in row:
                    summary = json.loads((run / "summary.json").read_text())
                    summary["partition"] = {"per_layer": {"conv1": 0.2, "conv2": 0.4}}
                    (run / "summary.json").write_text(json.dumps(summary))
                if "scale" in row:
                    tags = ("train/lambda_{}", 4) if is_glue_row(row) else ("pad/lambda_{}_mean", 1)
                    writer = SummaryWriter(str(run / "tb"))
                    for step in (1, 2):
                        writer.add_scalar(tags[0].format("d"), 1 + 0.1 * step, step * tags[1])
                        writer.add_scalar(tags[0].format("s"), 1 - 0.1 * step, step * tags[1])
                    writer.close()


def test_mini_suite_resumes_and_writes_tables_and_figures(tmp_path):
    """With every run finished, the suite trains nothing and writes every table and the four figures."""
    runs, results, figures_dir = tmp_path / "runs", tmp_path / "results", tmp_path / "figures"
    fake_suite(runs, 2)
    env = {"RUNS_ROOT": str(runs), "RESULTS": str(results), "FIGURES": str(figures_dir), "RUNS": str(tmp_path / "ignored")}
    result = run_finished_script("mini_suite", "--seeds", "2", env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "== " not in result.stdout.replace("=== ", "")  # no run started
    assert sorted(p.name for p in results.iterdir()) == sorted([f"{s}-mini.md" for s in SCRIPTS] + ["suite_cost-mini.md"])
    assert "| table1_imagenet_dyconv | " in (results / "suite_cost-mini.md").read_text()
    assert sorted(p.name for p in figures_dir.iterdir()) == sorted(
        ["accuracy_vs_dynamic_ratio.png", "scale_factors_over_training.png", "per_layer_dynamic_ratio.png",
         "paired_differences.png"])
    assert not (tmp_path / "ignored").exists()


def test_mini_suite_one_pipeline(tmp_path):
    """--pipeline glue: the text rows of every script, each in a table of its own; no figures."""
    runs, results, figures_dir = tmp_path / "runs", tmp_path / "results", tmp_path / "figures"
    fake_suite(runs, 2)
    env = {"RUNS_ROOT": str(runs), "RESULTS": str(results), "FIGURES": str(figures_dir)}
    result = run_finished_script("mini_suite", "--seeds", "2", "--pipeline", "glue", env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with_text = [s for s, (_, rows) in SCRIPTS.items() if any(is_glue_row(r) for r in rows)]
    assert sorted(p.name for p in results.iterdir()) == sorted(f"{s}-mini-glue.md" for s in with_text)
    assert "resnet10" not in "".join(p.read_text() for p in results.iterdir())
    assert not figures_dir.exists()


def finished_protocol_suite(tmp_path, pipeline: str) -> tuple[dict[str, str], Path]:
    """``mini_suite.sh --protocol --pipeline PIPELINE`` over a fake suite with every run finished: it must start no
    run. Returns its tables (name: text) and its figures folder."""
    runs, results, figures_dir = tmp_path / "runs", tmp_path / "results", tmp_path / "figures"
    fake_suite(runs, 5, scale="protocol")
    env = {"RUNS_ROOT": str(runs), "RESULTS": str(results), "FIGURES": str(figures_dir), "SEEDS": ""}
    result = run_finished_script("mini_suite", "--protocol", "--pipeline", pipeline, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    tables = {p.name: p.read_text() for p in results.iterdir()}
    return tables, figures_dir


def test_protocol_suite_runs_the_claims_and_ablations_it_fixed(tmp_path):
    """--protocol --pipeline dyconv with every run finished: the claims' tables at 5 seeds, the scale-factor,
    partition and dynamic-ratio ablations at 3, the accuracy-vs-ratio figure and the cost, all named -protocol."""
    tables, figures_dir = finished_protocol_suite(tmp_path, "dyconv")
    claims, ablations = ("table1_imagenet_dyconv", "table_dynamic_convs"), (
        "ablation_scale_factors", "ablation_partition", "ablation_dynamic_ratio")
    assert sorted(tables) == sorted([f"{s}-protocol-dyconv.md" for s in claims + ablations] + ["suite_cost-protocol.md"])
    for script in claims:
        assert "(5) |" in tables[f"{script}-protocol-dyconv.md"] and "(3) |" not in tables[f"{script}-protocol-dyconv.md"]
    for script in ablations:
        assert "(3) |" in tables[f"{script}-protocol-dyconv.md"] and "(5) |" not in tables[f"{script}-protocol-dyconv.md"]
    assert [p.name for p in figures_dir.iterdir()] == ["accuracy_vs_dynamic_ratio-protocol.png"]


def test_protocol_suite_text_rows(tmp_path):
    """--protocol --pipeline glue with every run finished: dense / MoE / PAD-MoE at 5 seeds; at 3 the text rows of
    the scale-factor ablation, of the partition ablation (taylor vs random vs one-shot) and of the dynamic-ratio
    sweep the selection note fixed (0.1 .. 1.0, not the paper's 0.3 .. 0.9)."""
    tables, _ = finished_protocol_suite(tmp_path, "glue")
    assert sorted(tables) == sorted([f"{s}-protocol-glue.md" for s in (
        "table2_glue_moe", "ablation_scale_factors", "ablation_partition", "ablation_dynamic_ratio")]
        + ["suite_cost-protocol.md"])
    assert "(5) |" in tables["table2_glue_moe-protocol-glue.md"]
    ratio_table = tables["ablation_dynamic_ratio-protocol-glue.md"]
    assert "(3) |" in ratio_table and "(5) |" not in ratio_table
    for ratio in PROTOCOL_TEXT_RATIOS:
        assert f"rte-pad{ratio} " in ratio_table
    assert "rte-pad0.9" not in ratio_table and "resnet10" not in ratio_table
    partition_table = tables["ablation_partition-protocol-glue.md"]
    for row in ("rte-pad-random - rte-pad-taylor", "rte-pad-oneshot - rte-pad-taylor"):
        assert row in partition_table


@pytest.mark.parametrize("args, message", [
    (["--mini"], "error: unknown argument --mini (expected --protocol, --seeds N, --jobs N, --pipeline P)"),
    (["--protocol", "--seeds", "3"], "error: --protocol runs the seeds results/regime_selection.md fixed (5 per claim, "
                                     "3 per ablation): drop --seeds"),
    (["--pipeline", "text"], "error: the pipeline must be dyconv, glue or all, got 'text'"),
    (["--jobs", "two"], "error: the number of jobs must be a positive integer, got 'two'"),
    (["--seeds", "-1"], "error: the number of seeds must be a positive integer, got '-1'"),
])
def test_mini_suite_bad_flags(args, message):
    result = subprocess.run(["bash", str(REPO / "scripts" / "mini_suite.sh"), *args], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == message + "\n"


# ---------------------------------------------------------------- rows shared by several scripts

def run_key(kind, *args) -> str:
    """scripts/run_key.py's key, computed in this process (the CLI itself: test_run_key_bad_arguments_...)."""
    spec = importlib.util.spec_from_file_location("run_key", REPO / "scripts" / "run_key.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with contextlib.chdir(REPO):  # the config paths are relative to the repository, as in lib.sh
        return module.run_key(kind, list(args))


def test_run_key_resolves_defaults_and_ignores_where_a_run_writes():
    mini = ["--config", "configs/dyconv/fashion_mnist_mini.yaml", "--arch", "resnet10", "--conv", "dyconv", "--pad"]
    key = run_key("dyconv", *mini, "--seed", "0", "--output", "a")
    assert run_key("dyconv", *mini, "--dynamic-ratio", "0.3", "--scale-factors", "both", "--seed", "0",
                   "--output", "b", "--resume", "b/checkpoint.pt", "--no-save-checkpoints") == key
    assert run_key("dyconv", *mini, "--seed", "1", "--output", "a") != key
    assert run_key("dyconv", *mini, "--scale-factors", "s", "--seed", "0", "--output", "a") != key
    glue = ["configs/glue/minilm_quick.json", "--glue_dir", "data/glue", "--task_name", "rte", "--moe", "pad"]
    key = run_key("glue", *glue, "--seed", "0", "--output_dir", "x")
    assert run_key("glue", *glue, "--dynamic_ratio", "0.5", "--seed", "0", "--output_dir", "y",
                   "--overwrite_output_dir") == key
    assert run_key("glue", *glue, "--dynamic_ratio", "0.7", "--seed", "0", "--output_dir", "x") != key


def test_run_key_does_not_hold_where_the_embedded_model_is_installed(monkeypatch, tmp_path):
    """Two checkouts' virtual environments hold the embedded model at two paths: one key. Another model: another."""
    import moe.run_glue
    glue = ["configs/glue/minilm_quick.json", "--glue_dir", "data/glue", "--task_name", "rte", "--seed", "0",
            "--output_dir", "x"]
    key = run_key("glue", *glue)
    installed = moe.run_glue.default_model_path()
    field = moe.run_glue.ModelArguments.__dataclass_fields__["model_name_or_path"]
    for place in ("a", "b"):
        (tmp_path / place).symlink_to(installed, target_is_directory=True)
        def elsewhere(place=place):
            return str(tmp_path / place)
        monkeypatch.setattr(moe.run_glue, "default_model_path", elsewhere)
        monkeypatch.setattr(field, "default_factory", elsewhere)
        assert run_key("glue", *glue) == key
    monkeypatch.undo()
    assert run_key("glue", *glue, "--model_name_or_path", str(tmp_path / "a")) != key


def test_run_key_holds_every_setting_and_no_place_a_run_saves_to():
    """Every setting of what a run computes is in the key (the default PAD-ODConv is the authors' channel-filter);
    where a run saves (--save-steps) is no setting."""
    odconv = ["--config", "configs/dyconv/fashion_mnist_mini.yaml", "--conv", "odconv", "--pad", "--seed", "0"]
    key = run_key("dyconv", *odconv)
    assert run_key("dyconv", *odconv, "--odconv-static-attention", "channel-filter") == key
    assert run_key("dyconv", *odconv, "--odconv-static-attention", "none") != key
    import run_key as run_key_module
    assert run_key_module.dyconv_settings(odconv + ["--odconv-static-attention", "none"])["odconv_static_attention"] \
        == "none"
    assert run_key("dyconv", *odconv, "--save-steps", "7") == key


def test_run_key_bad_arguments_are_one_error_line():
    result = subprocess.run([str(REPO / ".venv" / "bin" / "python"), str(REPO / "scripts" / "run_key.py"), "dyconv",
                             "--conv", "static", "--pad"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and result.stderr == "error: --pad needs a dynamic --conv (condconv, dyconv or odconv)\n"


def test_a_row_shared_by_two_scripts_runs_once_and_is_linked(tmp_path):
    """table_dynamic_convs' resnet10-dyconv-pad0.3 is table1's PAD row with the same resolved settings: when
    table1's run of it is finished, table_dynamic_convs links to it instead of training; a deleted owner
    makes the link go and the row run again."""
    root, results = tmp_path / "runs", tmp_path / "results"
    owner = root / "table1_imagenet_dyconv-mini" / "resnet10-dyconv-pad0.3" / "seed0"
    score = fake_run(owner, "resnet10-dyconv-pad0.3", 0)
    key = run_key("dyconv", "--config", "configs/dyconv/fashion_mnist_mini.yaml", "--arch", "resnet10", "--conv",
                  "dyconv", "--pad", "--dynamic-ratio", "0.3", "--seed", "0", "--output", str(owner))
    (root / ".shared-mini").mkdir()
    (root / ".shared-mini" / key).write_text(f"{owner}\n")
    folder = root / "table_dynamic_convs-mini"
    for row in SCRIPTS["table_dynamic_convs"][1]:
        if row != "resnet10-dyconv-pad0.3":
            fake_run(folder / row / "seed0", row, 0)
    env = {"RUNS_ROOT": str(root), "RESULTS": str(results)}
    result = run_script("table_dynamic_convs", "--mini", "--seeds", "1", env=env)
    assert result.returncode == 0, result.stderr
    link = folder / "resnet10-dyconv-pad0.3" / "seed0"
    assert link.is_symlink() and link.resolve() == owner.resolve()
    assert "is the same run as" in result.stdout and "== table_dynamic_convs: resnet10-dyconv-pad0.3 seed 0" not in result.stdout
    assert f"| resnet10-dyconv-pad0.3 | {score:.2f}" in (results / "table_dynamic_convs-mini.md").read_text()
    shutil.rmtree(owner)  # the owner gone: the dangling link goes and the row becomes this script's to run
    args = ["--config", "configs/dyconv/fashion_mnist_mini.yaml", "--arch", "resnet10", "--conv", "dyconv", "--pad",
            "--seed", "0", "--output", str(link)]
    result = subprocess.run(["bash", "-c", 'source scripts/lib.sh --mini; if same_run "$@"; then echo rc=0; else echo rc=1; fi', "lib",
                             str(link), "summary.json", "dyconv", *args], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, **env})
    assert result.stdout.strip().endswith("rc=1"), result.stdout + result.stderr
    assert not link.is_symlink() and not link.exists()
    assert (root / ".shared-mini" / key).read_text().strip() == str(link)


def test_protocol_rows_link_to_the_protocol_searchs_runs(tmp_path):
    """--protocol's static and DY-Conv rows have the settings of the search's chosen candidate: with the search's
    runs finished, table1 --protocol links to them (one index for the CPU scales) instead of training."""
    root, results = tmp_path / "runs", tmp_path / "results"
    (root / ".shared-mini").mkdir(parents=True)
    for conv in ("static", "dyconv"):
        owner = root / "regime_search-mini" / f"resnet10-w4-e2-{conv}" / "seed0"
        fake_run(owner, f"resnet10-w4-e2-{conv}", 0)
        key = run_key("dyconv", "--config", "configs/dyconv/fashion_mnist_mini.yaml", "--arch", "resnet10", "--conv",
                      conv, "--resnet-width", "4", "--epochs", "2", "--temp-epochs", "0.2", "--seed", "0")
        (root / ".shared-mini" / key).write_text(f"{owner}\n")
    fake_run(root / "table1_imagenet_dyconv-protocol" / "resnet10-dyconv-pad0.3" / "seed0", "resnet10-dyconv-pad0.3", 0)
    result = run_script("table1_imagenet_dyconv", "--protocol", "--seeds", "1", "--pipeline", "dyconv",
                        env={"RUNS_ROOT": str(root), "RESULTS": str(results)})
    assert result.returncode == 0, result.stderr
    assert "== table1_imagenet_dyconv: resnet10" not in result.stdout.replace("is the same run as", "")
    for conv in ("static", "dyconv"):
        link = root / "table1_imagenet_dyconv-protocol" / f"resnet10-{conv}" / "seed0"
        assert link.is_symlink() and link.resolve().parent.name == f"resnet10-w4-e2-{conv}"


def test_committed_run_records_keep_results_and_drop_weights():
    """results/runs/.gitignore (the suite's runs): the records of a run are committed, its weights are not."""
    run = "results/runs/table1_imagenet_dyconv-mini/resnet10-static/seed0"
    kept = [f"{run}/summary.json", f"{run}.log", f"{run}/tb/events.out.tfevents.1.host.2.0",
            "results/runs/table2_glue_moe-mini/rte-pad/seed0/all_results.json",
            "results/runs/table2_glue_moe-mini/rte-pad/seed0/partition.json",
            "results/runs/table2_glue_moe-mini/rte-pad/seed0/runs/Dec03_host/events.out.tfevents.1.host.2.0",
            "results/runs/.shared-mini/0123456789abcdef"]
    dropped = [f"{run}/checkpoint.pt", f"{run}/best.pt", f"{run}/model_compact.safetensors",
               "results/runs/table2_glue_moe-mini/rte-pad/seed0/model.safetensors",
               "results/runs/table2_glue_moe-mini/rte-pad/seed0/config.json",
               "results/runs/table2_glue_moe-mini/rte-pad/seed0/checkpoint-8/trainer_state.json", "runs/x/summary.json"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *kept, *dropped], capture_output=True, text=True,
                            cwd=REPO)
    assert sorted(result.stdout.split()) == sorted(dropped)


# ---------------------------------------------------------------- protocol search

SEARCH_IMAGE = ["w4-e2", "w8-e2", "w16-e2", "w4-e8", "w8-e8", "w16-e8"]
SEARCH_TEXT = ["n4096-e1", "n8000-e1"]


def search_rows(image, text):
    return ([f"resnet10-{s}-{conv}" for s in image for conv in ("static", "dyconv")]
            + [f"{task}-{s}-{moe}" for s in text for task in ("sst2", "rte") for moe in ("none", "moe")])


def test_regime_search_screens_every_candidate_and_confirms_one(tmp_path):
    """Screening tabulates fully dynamic - static/dense for every candidate of results/regime_selection.md;
    CONFIRM=<setting> runs and tabulates that one candidate alone, in a table of its own."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    for row in search_rows(SEARCH_IMAGE, SEARCH_TEXT):
        for seed in range(3):
            fake_run(runs / row / f"seed{seed}", row, seed)
    env = {"RUNS": str(runs), "RESULTS": str(results)}
    result = run_finished_script("regime_search", "--mini", "--seeds", "3", env=env)
    assert result.returncode == 0, result.stderr
    assert "== " not in result.stdout
    table = (results / "regime_search-mini.md").read_text()
    compared = [l.split(" | ")[0].lstrip("| ") for l in table.splitlines()
                if l.startswith("| ") and " - " in l.split(" | ")[0]]
    assert compared == ([f"resnet10-{s}-dyconv - resnet10-{s}-static" for s in SEARCH_IMAGE]
                        + [c for s in SEARCH_TEXT for c in (f"sst2-{s}-moe - sst2-{s}-none", f"rte-{s}-moe - rte-{s}-none",
                                                              f"average-{s}-moe - average-{s}-none")])
    assert "pad" not in "".join(compared)
    for seed in (3, 4):
        for row in search_rows(["w8-e2"], []):
            fake_run(runs / row / f"seed{seed}", row, seed)
    result = run_script("regime_search", "--mini", "--seeds", "5", env={**env, "CONFIRM": "w8-e2"})
    assert result.returncode == 0, result.stderr
    table = (results / "regime_search-confirm-w8-e2-mini.md").read_text()
    assert "Produced by `CONFIRM=w8-e2 bash scripts/regime_search.sh --mini --seeds 5`." in table
    assert "| resnet10-w8-e2-dyconv - resnet10-w8-e2-static | " in table and " (5) |" in table
    assert "w4-e2" not in table


@pytest.mark.parametrize("args, env, message", [
    (["--mini"], {"CONFIRM": "w5-e3"}, "error: CONFIRM=w5-e3 is not a candidate"),
    ([], {}, "error: regime_search.sh runs at CPU scale only: pass --mini"),
])
def test_regime_search_bad_input(args, env, message):
    result = run_script("regime_search", *args, env=env)
    assert result.returncode == 2 and result.stderr.startswith(message) and result.stderr.count("\n") == 1


def test_protocol_scale_rows_seeds_and_table(tmp_path):
    """--protocol: table1's ResNet-10 rows over 5 seeds by default in runs/<script>-protocol, a -protocol table."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    rows = table1_rows(["resnet10"])
    for row in rows:
        for seed in range(5):
            fake_run(runs / "table1_imagenet_dyconv-protocol" / row / f"seed{seed}", row, seed)
    result = run_finished_script("table1_imagenet_dyconv", "--protocol", "--pipeline", "dyconv",
                                 env={"RUNS_ROOT": str(runs), "RESULTS": str(results)})
    assert result.returncode == 0, result.stderr
    assert "== " not in result.stdout
    table = (results / "table1_imagenet_dyconv-protocol-dyconv.md").read_text()
    assert "Produced by `bash scripts/table1_imagenet_dyconv.sh --protocol --seeds 5 --pipeline dyconv`." in table
    assert "mobilenetv2" not in table and "| resnet10-dyconv | " in table and " (5) |" in table


@pytest.mark.parametrize("args, message", [
    (["--protocol", "--mini"], "error: --protocol excludes --mini, --gpu and --smoke"),
    (["--gpu", "--protocol"], "error: --protocol excludes --mini, --gpu and --smoke"),
    (["--protocol", "--smoke"], "error: --protocol excludes --mini, --gpu and --smoke"),
])
def test_protocol_flag_exclusions(args, message):
    result = run_script("table_dynamic_convs", *args)
    assert result.returncode == 2 and result.stderr == message + "\n"


def test_protocol_rows_need_the_chosen_protocols_config():
    result = subprocess.run(["bash", "-c", 'source scripts/lib.sh --protocol; require_config configs/none.yaml'],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr == ("error: configs/none.yaml does not exist: the protocol for these rows is not chosen yet "
                             "(results/regime_selection.md)\n")
