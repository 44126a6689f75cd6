"""moe/run_glue.py end to end on tiny GLUE TSV fixtures and a tiny random BERT (CPU, offline)."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import pad
from pad.partition import score_positions
from pad.runtime import code_version, machine_description

from moe.run_glue import main

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "movie", "film", "is", "was", "it", "and", "of", "to"]
PAIR_LABELS = ["entailment", "neutral", "contradiction"]
MNLI_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
               "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]


def sentence(rng, cue):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) + f" {cue}"


def write_tsv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + rows
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in lines))


def make_glue_dir(root: Path, n_train=32, n_dev=16, n_test=6) -> Path:
    """SST-2, MNLI (matched + mismatched) and STS-B folders in GLUE's layouts, with learnable cues."""
    rng = random.Random(0)
    sst = lambda n: [[sentence(rng, "great good" if i % 2 else "bad"), i % 2] for i in range(n)]  # noqa: E731
    write_tsv(root / "SST-2" / "train.tsv", ["sentence", "label"], sst(n_train))
    write_tsv(root / "SST-2" / "dev.tsv", ["sentence", "label"], sst(n_dev))
    write_tsv(root / "SST-2" / "test.tsv", ["index", "sentence"], [[i, s] for i, (s, _) in enumerate(sst(n_test))])

    def mnli(n, genre):
        rows = []
        for i in range(n):
            label = PAIR_LABELS[i % 3]
            rows.append([i, i, f"{i}x", genre, "", "", "", "", sentence(rng, "a"), sentence(rng, label[:3]),
                         label, label])
        return rows
    write_tsv(root / "MNLI" / "train.tsv", MNLI_HEADER, mnli(n_train, "fiction"))
    write_tsv(root / "MNLI" / "dev_matched.tsv", MNLI_HEADER, mnli(n_dev, "fiction"))
    write_tsv(root / "MNLI" / "dev_mismatched.tsv", MNLI_HEADER, mnli(n_dev - 4, "letters"))

    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score"]
    sts = lambda n: [[i, "main", "f", "2012", i, "none", "none", sentence(rng, "a"), sentence(rng, "b"),  # noqa: E731
                      f"{rng.uniform(0, 5):.3f}"] for i in range(n)]
    write_tsv(root / "STS-B" / "train.tsv", header, sts(n_train))
    write_tsv(root / "STS-B" / "dev.tsv", header, sts(n_dev))
    return root


def base_args(model_dir, glue_dir, out, task, *extra):
    return ["--model_name_or_path", str(model_dir), "--glue_dir", str(glue_dir), "--task_name", task,
            "--output_dir", str(out), "--max_seq_length", "24", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "8", "--num_train_epochs", "1", "--learning_rate", "1e-3",
            "--use_cpu", "true", "--disable_tqdm", "true", "--report_to", "none", "--save_strategy", "no",
            "--seed", "0", "--num_experts", "4", "--partition_batches", "2", "--partition_iterations", "3",
            "--logging_steps", "2", *extra]


def read_json(path):
    return json.loads(Path(path).read_text())


def masks(out) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(Path(out) / "model.safetensors")).items() if k.endswith(".mask")}


def metric_values(results):
    """The metrics a re-evaluation must reproduce (timings excluded)."""
    timings = ("runtime", "per_second", "preparation_time")
    return {k: v for k, v in results.items() if k.startswith("eval_") and not any(t in k for t in timings)}


def check_reload(out, glue_dir, task, tmp_path):
    """``--model_name_or_path OUT --do_eval`` rebuilds the model and reproduces its eval metrics exactly."""
    again = tmp_path / f"reeval_{task}"
    assert main(base_args(out, glue_dir, again, task, "--do_eval")) == 0
    reloaded, original = read_json(again / "eval_results.json"), read_json(Path(out) / "eval_results.json")
    assert metric_values(reloaded) == metric_values(original)
    for key in ("moe", "num_experts", "top_k", "dynamic_ratio", "ffn_params_dense", "ffn_params_compact"):
        assert reloaded[key] == original[key], key


def check_pad_statistics(out, results, target=0.5):
    """Achieved ratio within one position per PAD layer; compact count derived from the saved masks."""
    saved = load_file(str(Path(out) / "model.safetensors"))
    layer_masks = [v for k, v in saved.items() if k.endswith(".mask")]
    entries = sum(m.numel() for m in layer_masks)
    assert abs(results["dynamic_ratio"] - target) <= len(layer_masks) / entries
    assert results["dynamic_ratio"] == pytest.approx(sum(m.sum().item() for m in layer_masks) / entries)
    experts = read_json(Path(out) / "config.json")["moe"]["num_experts"]
    unused = sum(m.sum().item() + (m.numel() - m.sum().item()) * experts for m in layer_masks)
    assert results["ffn_params_dense"] > results["ffn_params_compact"]
    assert results["ffn_params_dense"] - results["ffn_params_compact"] == unused


@pytest.fixture(scope="module")
def sst2_pad_run(tiny_bert_dir, glue_dir, tmp_path_factory):
    """The default PAD run on SST-2 (train, eval, predict, TensorBoard), shared by several tests."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sst2_pad")
    args = base_args(tiny_bert_dir, glue_dir, out, "sst2", "--moe", "pad", "--do_train", "--do_eval",
                     "--do_predict", "--max_predict_samples", "4", "--overwrite_output_dir", "true")
    args[args.index("--report_to") + 1] = "tensorboard"
    assert main(args) == 0
    return out


# ---------------------------------------------------------------- end to end

def test_sst2_pad_end_to_end(sst2_pad_run, glue_dir, tmp_path):
    out = sst2_pad_run
    for name in ("eval_results.json", "all_results.json", "train_results.json", "trainer_state.json",
                 "partition.json", "config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    results = read_json(out / "eval_results.json")
    assert {"eval_accuracy", "eval_loss"} <= set(results) and results["moe"] == "pad"
    check_pad_statistics(out, results)
    train = read_json(out / "train_results.json")
    assert train["partition_achieved"] == results["dynamic_ratio"] and train["partition_target"] == 0.5
    assert read_json(out / "all_results.json")["eval_accuracy"] == results["eval_accuracy"]
    assert read_json(out / "all_results.json")["machine"] == machine_description()  # where it ran
    assert read_json(out / "all_results.json")["commit"] == code_version()
    # GLUE's submission file: SST-2.tsv, the test file's index, labels 0/1
    predictions = (out / "SST-2.tsv").read_text().splitlines()
    assert predictions[0] == "index\tprediction" and len(predictions) == 1 + 4
    assert [line.split("\t")[0] for line in predictions[1:]] == ["0", "1", "2", "3"]
    assert {line.split("\t")[1] for line in predictions[1:]} <= {"0", "1"}
    check_reload(out, glue_dir, "sst2", tmp_path)


def test_training_logs_task_and_aux_loss(sst2_pad_run):
    history = [h for h in read_json(sst2_pad_run / "trainer_state.json")["log_history"] if "loss" in h]
    assert history
    for entry in history:
        # the optimised loss is the task loss plus the gates' aux loss
        assert entry["loss"] == pytest.approx(entry["task_loss"] + entry["aux_loss"], abs=1e-3)
        assert entry["aux_loss"] > 0
        assert sum(entry[f"expert_load/e{e}"] for e in range(4)) == pytest.approx(1.0, abs=1e-4)
        assert entry["lambda_d"] + entry["lambda_s"] == pytest.approx(2.0)
        assert entry["dynamic_ratio"] == pytest.approx(read_json(sst2_pad_run / "eval_results.json")["dynamic_ratio"])


def test_tensorboard_events_hold_moe_statistics(sst2_pad_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    event_files = list((sst2_pad_run / "runs").rglob("events.out.tfevents.*"))
    assert event_files
    tags = set()
    for f in event_files:
        tags |= set(EventAccumulator(str(f)).Reload().Tags()["scalars"])
    assert {"train/task_loss", "train/aux_loss", "train/dynamic_ratio", "train/lambda_d", "train/lambda_s",
            "train/expert_load/e0", "train/expert_load/e3"} <= tags


def test_mnli_pad_matched_and_mismatched(make_tiny_bert_dir, glue_dir, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "mnli"
    assert main(base_args(make_tiny_bert_dir(num_labels=3), glue_dir, out, "mnli", "--moe", "pad",
                          "--do_train", "--do_eval")) == 0
    results = read_json(out / "eval_results.json")
    assert results["eval_samples"] == 16 and results["eval_samples_mm"] == 12
    assert 0 <= results["eval_accuracy"] <= 1 and 0 <= results["eval_accuracy_mm"] <= 1
    assert read_json(out / "config.json")["id2label"] == {"0": "entailment", "1": "neutral", "2": "contradiction"}
    check_pad_statistics(out, results)
    check_reload(out, glue_dir, "mnli", tmp_path)


def test_stsb_pad_regression(make_tiny_bert_dir, glue_dir, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "stsb"
    assert main(base_args(make_tiny_bert_dir(num_labels=1), glue_dir, out, "stsb", "--moe", "pad",
                          "--do_train", "--do_eval")) == 0
    results = read_json(out / "eval_results.json")
    assert -1 <= results["eval_pearson"] <= 1 and -1 <= results["eval_spearmanr"] <= 1
    assert len(read_json(out / "config.json")["id2label"]) == 1
    check_pad_statistics(out, results)
    check_reload(out, glue_dir, "stsb", tmp_path)


# ---------------------------------------------------------------- every MoE flag changes the run

def test_moe_flags_change_the_run(sst2_pad_run, tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "flags"
    assert main(base_args(tiny_bert_dir, glue_dir, out, "sst2", "--moe", "pad", "--do_train", "--do_eval",
                          "--num_experts", "2", "--top_k", "1", "--moe_layers", "intermediate",
                          "--aux_loss_coef", "0", "--dynamic_ratio", "0.25", "--scale_factors", "none",
                          "--partition_criterion", "magnitude", "--partition_schedule", "linear",
                          "--partition_scope", "local", "--partition_iterations", "2")) == 0
    default, changed = read_json(sst2_pad_run / "config.json")["moe"], read_json(out / "config.json")["moe"]
    assert default == dict(moe="pad", num_experts=4, top_k=2, moe_layers="both", aux_loss_coef=0.01,
                           scale_factors="both", partition_granularity="element")
    assert changed == dict(moe="pad", num_experts=2, top_k=1, moe_layers="intermediate", aux_loss_coef=0.0,
                           scale_factors="none", partition_granularity="element")
    state, default_state = load_file(str(out / "model.safetensors")), load_file(str(sst2_pad_run / "model.safetensors"))
    # --num_experts: the kernel banks; --moe_layers: output.dense stays a plain linear layer
    assert state["bert.encoder.layer.0.intermediate.dense.experts.kernels"].shape[0] == 2
    assert default_state["bert.encoder.layer.0.intermediate.dense.experts.kernels"].shape[0] == 4
    assert "bert.encoder.layer.0.output.dense.weight" in state
    assert "bert.encoder.layer.0.output.dense.experts.kernels" in default_state
    # --scale_factors none: no phi parameter
    assert not any(k.endswith("scale.phi") for k in state) and any(k.endswith("scale.phi") for k in default_state)
    results, default_results = read_json(out / "eval_results.json"), read_json(sst2_pad_run / "eval_results.json")
    assert results["ffn_params_dense"] < default_results["ffn_params_dense"]
    assert results["num_experts"] == 2 and results["top_k"] == 1
    check_pad_statistics(out, results, target=0.25)
    # --aux_loss_coef 0: no aux loss
    assert all(h["aux_loss"] == 0 for h in read_json(out / "trainer_state.json")["log_history"] if "loss" in h)
    # --partition_*: the report, the linear schedule and the per-layer (local) ratios
    report = read_json(out / "partition.json")
    assert (report["criterion"], report["schedule"], report["scope"], report["iterations"]) == \
        ("magnitude", "linear", "local", 2)
    layer_masks = masks(out)
    assert report["ratio_per_iteration"][0] == pytest.approx(1 - 0.75 / 2, abs=len(layer_masks) / 4096)
    for mask in layer_masks.values():
        assert abs(mask.mean().item() - 0.25) <= 1 / mask.numel()
    default_report = read_json(sst2_pad_run / "partition.json")
    assert (default_report["criterion"], default_report["schedule"], default_report["scope"],
            len(default_report["ratio_per_iteration"])) == ("taylor", "exponential", "global", 3)


def test_partition_batches_sets_the_batches_scored(tiny_bert_dir, glue_dir, tmp_path):
    # Upcycled experts equal W_s, so no data-driven score can tell batches apart at
    # initialisation; what the flag changes is the number of batches IMP scores.
    for requested, used in ((1, 1), (100, 4)):  # 32 training examples / batch 8 = 4 batches
        out = tmp_path / f"batches{requested}"
        assert main(base_args(tiny_bert_dir, glue_dir, out, "sst2", "--moe", "pad", "--do_train",
                              "--max_steps", "1", "--partition_batches", str(requested))) == 0
        assert read_json(out / "partition.json")["batches"] == used
        assert read_json(out / "train_results.json")["partition_batches"] == used


def test_partition_warmup_steps_partitions_trained_experts(tiny_bert_dir, glue_dir, tmp_path):
    """At step 0 upcycled experts equal W_s and every taylor score is 0 (random partition); after
    warm-up steps the experts differ, IMP runs at that step and the scores are data-driven."""
    out = tmp_path / "warmup"
    assert main(base_args(tiny_bert_dir, glue_dir, out, "sst2", "--moe", "pad", "--do_train",
                          "--partition_warmup_steps", "2", "--partition_scope", "local")) == 0
    report, train = read_json(out / "partition.json"), read_json(out / "train_results.json")
    assert report["step"] == 2 and train["partition_step"] == 2
    assert abs(train["dynamic_ratio"] - 0.5) < 0.01
    history = read_json(out / "trainer_state.json")["log_history"]
    assert [h["step"] for h in history if "partition/dynamic_ratio" in h] == [2]

    # the scores IMP saw at step 2 are not all zero any more (they are at step 0)
    from moe.modeling import convert_to_moe
    from transformers import AutoModelForSequenceClassification
    model = convert_to_moe(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir), moe="pad")
    ids = torch.randint(5, 20, (4, 8))
    batch = {"input_ids": ids, "labels": torch.tensor([0, 1, 0, 1])}
    at_init = score_positions(model, [batch], lambda m, b: m(**b).loss, "taylor")
    assert all(torch.all(s == 0) for s in at_init.values())
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, pad.PartiallyDynamicWeights):
                layer.kernels.add_(0.01 * torch.randn_like(layer.kernels))
    moved = score_positions(model, [batch], lambda m, b: m(**b).loss, "taylor")
    assert all(s.sum() > 0 for s in moved.values())
    assert main(base_args(tiny_bert_dir, glue_dir, tmp_path / "bad", "sst2", "--moe", "pad", "--do_train",
                          "--partition_warmup_steps", "-1")) == 2


def test_moe_none_and_moe(tiny_bert_dir, glue_dir, tmp_path):
    for kind, ratio in (("none", 0.0), ("moe", 1.0)):
        out = tmp_path / kind
        assert main(base_args(tiny_bert_dir, glue_dir, out, "sst2", "--moe", kind, "--do_train", "--do_eval",
                              "--max_train_samples", "16", "--max_eval_samples", "8")) == 0
        results, train = read_json(out / "eval_results.json"), read_json(out / "train_results.json")
        assert results["moe"] == kind and results["dynamic_ratio"] == ratio
        assert results["eval_samples"] == 8 and train["train_samples"] == 16
        assert not (out / "partition.json").exists()
        assert ("moe" in read_json(out / "config.json")) == (kind == "moe")
    dense, moe = read_json(tmp_path / "none" / "eval_results.json"), read_json(tmp_path / "moe" / "eval_results.json")
    assert dense["ffn_params_dense"] == dense["ffn_params_compact"] < moe["ffn_params_dense"]


def test_csv_files_json_config_and_cache_dir(tiny_bert_dir, tmp_path):
    rows = "".join(f"{'good great' if i % 2 else 'bad'} movie,{'pos' if i % 2 else 'neg'}\n" for i in range(16))
    (tmp_path / "train.csv").write_text("text,label\n" + rows)
    (tmp_path / "dev.csv").write_text("text,label\n" + rows[: len(rows) // 2])
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"moe": "moe", "num_experts": 8, "do_train": True, "do_eval": True,
                                  "report_to": ["none"]}))
    out, cache = tmp_path / "csv", tmp_path / "cache"
    args = [str(config), "--model_name_or_path", str(tiny_bert_dir), "--train_file", str(tmp_path / "train.csv"),
            "--validation_file", str(tmp_path / "dev.csv"), "--output_dir", str(out), "--cache_dir", str(cache),
            "--num_experts", "3", "--use_cpu", "true", "--disable_tqdm", "true", "--save_strategy", "no",
            "--max_seq_length", "16"]
    assert main(args) == 0
    results = read_json(out / "eval_results.json")
    assert results["moe"] == "moe" and results["num_experts"] == 3  # the flag overrides the JSON file
    assert results["eval_samples"] == 8 and 0 <= results["eval_accuracy"] <= 1
    assert read_json(out / "config.json")["id2label"] == {"0": "neg", "1": "pos"}
    assert any(cache.iterdir())  # the CSV dataset was built under --cache_dir


# ---------------------------------------------------------------- bad input

def distilbert_dir(tiny_bert_dir, root: Path) -> Path:
    """A tiny DistilBERT (feed-forward layers ffn.lin1/lin2, not BERT-style) with the tiny tokenizer."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    path = root / "distilbert"
    shutil.copytree(tiny_bert_dir, path)
    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                              max_position_embeddings=64)
    DistilBertForSequenceClassification(config).save_pretrained(path)
    return path


def bad_glue_dir(root: Path, train_rows, header=("sentence", "label")) -> Path:
    write_tsv(root / "SST-2" / "train.tsv", list(header), train_rows)
    write_tsv(root / "SST-2" / "dev.tsv", ["sentence", "label"], [["good", 1]])
    return root


@pytest.mark.parametrize("case, message", [
    ("unknown_task", "error: unknown task 'sst3'; expected one of cola, sst2"),
    ("missing_column", "train.tsv: missing column(s) ['sentence'] for task sst2"),
    ("bad_label", "train.tsv line 3: label '7' is not one of the sst2 labels ['0', '1']"),
    ("top_k", "error: top_k must be between 1 and num_experts (4), got 5"),
    ("ratio_zero", "error: dynamic ratio must be in (0, 1], got 0.0"),
    ("ratio_big", "error: dynamic ratio must be in (0, 1], got 1.5"),
    ("no_ffn", "error: DistilBertForSequenceClassification has no BERT-style feed-forward layers"),
    ("missing_dir", "SST-2/train.tsv: no such file"),
    ("hub_offline", "error: could not load GLUE task sst2 from the Hub"),
    ("bad_choice", "error: argument --moe: invalid choice: 'dense'"),
    ("conflicting_moe", "is already a 'pad' model; drop --moe moe"),
    ("conflicting_experts", "is a saved 'pad' model with num_experts 4; drop --num_experts 2"),
    ("output_exists", "exists and is not empty; use --overwrite_output_dir"),
])
def test_bad_input_one_line_and_exit_code(case, message, tiny_bert_dir, glue_dir, sst2_pad_run, tmp_path,
                                          capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, data, out, extra = tiny_bert_dir, glue_dir, tmp_path / "out", ["--moe", "pad", "--do_train"]
    if case == "unknown_task":
        args = base_args(model, data, out, "sst3", *extra)
    else:
        if case == "missing_column":
            data = bad_glue_dir(tmp_path / "g", [["good", 1]], header=("text", "label"))
        elif case == "bad_label":
            data = bad_glue_dir(tmp_path / "g", [["good", 1], ["bad", 7]])
        elif case == "top_k":
            extra += ["--top_k", "5"]
        elif case in ("ratio_zero", "ratio_big"):
            extra += ["--dynamic_ratio", "0" if case == "ratio_zero" else "1.5"]
        elif case == "no_ffn":
            model = distilbert_dir(tiny_bert_dir, tmp_path)
        elif case == "missing_dir":
            data = tmp_path / "nowhere"
        elif case == "bad_choice":
            extra = ["--moe", "dense"]
        elif case == "conflicting_moe":
            model, extra = sst2_pad_run, ["--moe", "moe", "--do_eval"]
        elif case == "conflicting_experts":
            model, extra = sst2_pad_run, ["--do_eval"]
        elif case == "output_exists":
            out.mkdir()
            (out / "keep.txt").write_text("a good result")
        args = base_args(model, data, out, "sst2", *extra)
        if case == "conflicting_experts":
            args[args.index("--num_experts") + 1] = "2"
        if case == "hub_offline":
            args = [a for a in args if a not in ("--glue_dir", str(data))]
    capfd.readouterr()
    assert main(args) == 2  # every kind of bad input, argument errors included
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    if case == "output_exists":
        assert (out / "keep.txt").read_text() == "a good result"


def test_cli_script_bad_input_exits_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "moe/run_glue.py", "--task_name", "nope", "--output_dir",
                             str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown task 'nope'; expected one of " \
                                    "cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli"


def test_torchrun_two_processes_on_cpu(tiny_bert_dir, glue_dir, tmp_path):
    """Trainer's own DDP (gloo on CPU): both ranks partition, take rank 0's masks, train and save once."""
    out = tmp_path / "ddp"
    args = base_args(tiny_bert_dir, glue_dir, out, "sst2", "--moe", "pad", "--do_train", "--do_eval",
                     "--partition_scope", "local")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "moe" / "run_glue.py"), *args, "--ddp_backend", "gloo"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_json(out / "all_results.json")
    assert abs(results["dynamic_ratio"] - 0.5) < 0.01
    assert read_json(out / "partition.json")["achieved"] == pytest.approx(results["dynamic_ratio"])
    assert all(abs(m.float().mean().item() - 0.5) < 0.02 for m in masks(out).values())


# ---------------------------------------------------------------- test-set predictions: GLUE's submission files

def read_submission(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "index\tprediction"
    return [line.split("\t") for line in lines[1:]]


def test_mnli_predict_writes_matched_mismatched_and_ax(make_tiny_bert_dir, glue_dir, tmp_path):
    """MNLI from --glue_dir: test_matched, test_mismatched and the diagnostic set (AX) predicted into
    MNLI-m.tsv, MNLI-mm.tsv and AX.tsv with the files' own index and MNLI's label strings."""
    torch.set_num_threads(1)
    data = tmp_path / "glue"
    shutil.copytree(glue_dir / "MNLI", data / "MNLI")
    rng = random.Random(1)
    test_header = MNLI_HEADER[:10]
    for name, n, first in (("test_matched", 5, 100), ("test_mismatched", 4, 200)):
        write_tsv(data / "MNLI" / f"{name}.tsv", test_header,
                  [[first + i, i, f"{i}t", "fiction", "", "", "", "", sentence(rng, "a"), sentence(rng, "b")]
                   for i in range(n)])
    write_tsv(data / "diagnostic" / "diagnostic.tsv", ["index", "sentence1", "sentence2"],
              [[i, sentence(rng, "a"), sentence(rng, "c")] for i in range(3)])
    out = tmp_path / "out"
    assert main(base_args(make_tiny_bert_dir(num_labels=3), data, out, "mnli", "--moe", "moe",
                          "--do_predict")) == 0
    expected = {"MNLI-m.tsv": [str(100 + i) for i in range(5)], "MNLI-mm.tsv": [str(200 + i) for i in range(4)],
                "AX.tsv": ["0", "1", "2"]}
    for name, indexes in expected.items():
        rows = read_submission(out / name)
        assert [r[0] for r in rows] == indexes
        assert {r[1] for r in rows} <= set(PAIR_LABELS)
    assert sorted(p.name for p in out.glob("*.tsv")) == sorted(expected)


def test_mnli_predict_from_csv_files(make_tiny_bert_dir, tmp_path):
    """MNLI from --test_file: the file is the matched test set, written as MNLI-m.tsv."""
    torch.set_num_threads(1)
    test = tmp_path / "test.csv"
    test.write_text("premise,hypothesis\n" + "".join(f"the movie {i},it was good\n" for i in range(3)))
    out = tmp_path / "out"
    args = ["--model_name_or_path", str(make_tiny_bert_dir(num_labels=3)), "--task_name", "mnli", "--test_file",
            str(test), "--do_predict", "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
            "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--max_seq_length", "16"]
    assert main(args) == 0
    rows = read_submission(out / "MNLI-m.tsv")
    assert [r[0] for r in rows] == ["0", "1", "2"] and {r[1] for r in rows} <= set(PAIR_LABELS)


def test_stsb_predict_writes_scores(make_tiny_bert_dir, glue_dir, tmp_path):
    torch.set_num_threads(1)
    data = tmp_path / "glue"
    shutil.copytree(glue_dir / "STS-B", data / "STS-B")
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
    write_tsv(data / "STS-B" / "test.tsv", header,
              [[i, "main", "f", "2012", i, "none", "none", "a movie", "the film"] for i in range(3)])
    out = tmp_path / "out"
    assert main(base_args(make_tiny_bert_dir(num_labels=1), data, out, "stsb", "--do_predict")) == 0
    rows = read_submission(out / "STS-B.tsv")
    assert [r[0] for r in rows] == ["0", "1", "2"]
    assert all(len(r[1].split(".")[1]) == 3 and float(r[1]) == float(r[1]) for r in rows)


@pytest.mark.parametrize("task, file_name, labels", [
    ("cola", "CoLA", ["0", "1"]), ("sst2", "SST-2", ["0", "1"]), ("mrpc", "MRPC", ["0", "1"]),
    ("qqp", "QQP", ["0", "1"]), ("wnli", "WNLI", ["0", "1"]), ("qnli", "QNLI", ["entailment", "not_entailment"]),
    ("rte", "RTE", ["entailment", "not_entailment"]), ("mnli", "MNLI-m", ["entailment", "neutral", "contradiction"]),
])
def test_submission_labels_follow_glue(task, file_name, labels):
    from moe import glue
    from moe.run_glue import SUBMISSION_FILES, submission_lines
    spec = glue.get_task(task)
    assert SUBMISSION_FILES[task] == file_name
    ids = list(range(spec.num_labels))
    assert submission_lines(spec, list(spec.label_names), [7 + i for i in ids], ids) == \
        ["index\tprediction"] + [f"{7 + i}\t{label}" for i, label in zip(ids, labels)]


def test_submission_lines_for_scores_and_files_without_a_task():
    from moe import glue
    from moe.run_glue import submission_lines
    assert submission_lines(glue.get_task("stsb"), None, [0, 1], np.array([2.71828, 0.5])) == \
        ["index\tprediction", "0\t2.718", "1\t0.500"]
    assert submission_lines(None, ["neg", "pos"], [0, 1], np.array([1, 0])) == \
        ["index\tprediction", "0\tpos", "1\tneg"]
