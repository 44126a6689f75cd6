"""Hazardous input, each generated here, refused before it costs anything: one ``error:`` line naming the
file or flag, exit status 2, nothing trained or written where refused, no hang.

dyconv/main.py: link loops, FIFOs and decompression bombs in image folders, an absurd --image-size, seeds
torch cannot take, a --dynamic-ratio that keeps no dynamic position.  moe/run_glue.py: evaluation labels
training never saw, --partition_warmup_steps at or past the run's last step, a --max_seq_length below the
tokenizer's special tokens, seeds numpy cannot take, a --dynamic_ratio that keeps no dynamic position."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_image_folder
from dyconv.main import main as dyconv_main

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = ("checkpoint.pt", "best.pt", "summary.json", "model_compact.safetensors")
torch.set_num_threads(1)


def one_error_line(rc: int, err: str) -> str:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def nothing_written(out: Path) -> bool:
    return not any((out / name).exists() for name in RUN_FILES)


# ---------------------------------------------------------------- dyconv

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """DIR/{train,val}/c{0,1}/*.png of random 32x32 images, 4 + 2 per class."""
    return write_image_folder(tmp_path_factory.mktemp("images"), classes=2, train=4, val=2)


def dyconv_args(data, out, *extra) -> list[str]:
    return ["--data", str(data), "--arch", "resnet10", "--image-size", "32", "--epochs", "1", "--conv", "static",
            "--batch-size", "4", "--workers", "0", "--output", str(out), *extra]


def dyconv_refuses(argv, capsys) -> str:
    capsys.readouterr()
    rc = dyconv_main(argv)
    return one_error_line(rc, capsys.readouterr().err)


def copy_of(folder: Path, tmp_path: Path) -> Path:
    shutil.copytree(folder, tmp_path / "data", symlinks=True)
    return tmp_path / "data"


def test_dyconv_link_loop_in_a_class_folder_is_refused(image_folder, tmp_path, capsys):
    data = copy_of(image_folder, tmp_path)
    (data / "train" / "c0" / "loop").symlink_to("..", target_is_directory=True)
    err = dyconv_refuses(dyconv_args(data, tmp_path / "out"), capsys)
    assert f"{data}/train/c0/loop leads to" in err and "symbolic-link loop" in err
    assert nothing_written(tmp_path / "out")


def test_dyconv_fifo_named_png_is_refused_without_a_hang(image_folder, tmp_path):
    data = copy_of(image_folder, tmp_path)
    os.mkfifo(data / "val" / "c1" / "pipe.png")
    result = subprocess.run([sys.executable, "dyconv/main.py", *dyconv_args(data, tmp_path / "out")], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = one_error_line(result.returncode, result.stderr)
    assert f"image {data}/val/c1/pipe.png is a FIFO (named pipe), not a regular file" in line
    assert nothing_written(tmp_path / "out")


def test_dyconv_decompression_bomb_is_one_error_line(image_folder, tmp_path, capsys):
    from test_dyconv_data import write_bomb_png
    data = copy_of(image_folder, tmp_path)
    write_bomb_png(data / "train" / "c1" / "bomb.png")
    err = dyconv_refuses(dyconv_args(data, tmp_path / "out"), capsys)
    assert err.startswith(f"error: cannot read image {data}/train/c1/bomb.png: a decompression bomb"), err
    assert nothing_written(tmp_path / "out")


@pytest.mark.parametrize("flag, value, message", [
    ("--image-size", "100000", "argument --image-size: must be <= 4096, got 100000"),
    ("--seed", str(2**70), f"argument --seed: must be <= {2**63 - 1}, got {2**70}"),
    ("--seed", "-1", "argument --seed: must be >= 0, got -1"),
])
def test_dyconv_out_of_range_flags(flag, value, message, image_folder, tmp_path, capsys):
    err = dyconv_refuses(dyconv_args(image_folder, tmp_path / "out", flag, value), capsys)
    assert err == f"error: {message}"
    assert not (tmp_path / "out").exists()  # refused before the output folder is made


def test_dyconv_ratio_without_a_dynamic_position_is_refused_before_partition(image_folder, tmp_path, capsys):
    args = dyconv_args(image_folder, tmp_path / "out", "--conv", "dyconv", "--pad", "--kernels", "2",
                       "--dynamic-ratio", "1e-9", "--resnet-width", "8")
    err = dyconv_refuses(args, capsys)
    assert err.startswith("error: --dynamic-ratio 1e-09 would leave no dynamic position in the model (")
    assert "a static model is not PAD; the smallest ratio that keeps one dynamic element per model is " in err
    assert nothing_written(tmp_path / "out")


# ---------------------------------------------------------------- run_glue

def glue_args(model, glue_dir, out, *extra, task="sst2") -> list[str]:
    from test_run_glue import base_args
    return base_args(model, glue_dir, out, task, "--do_train", "--do_eval", *extra)


def glue_refuses(argv, capfd) -> str:
    """The one error line; run_glue's stderr also carries the datasets library's progress bars."""
    from moe.run_glue import main
    capfd.readouterr()
    rc = main(argv)
    err = capfd.readouterr().err
    bars = ("Generating ", "Map", "Running tokenizer")
    return one_error_line(rc, "\n".join(line for line in err.replace("\r", "\n").splitlines()
                                        if line.strip() and not line.startswith(bars)))


def nothing_trained(out: Path) -> bool:
    return not out.exists() or not any(p.name in ("model.safetensors", "train_results.json", "eval_results.json")
                                       or p.name.startswith("checkpoint-") for p in out.iterdir())


def test_glue_evaluation_label_unseen_in_training_is_refused_before_training(tiny_bert_dir, tmp_path, capfd):
    train = "".join(f"{'good great' if i % 2 else 'bad'} movie,{'pos' if i % 2 else 'neg'}\n" for i in range(8))
    (tmp_path / "train.csv").write_text("text,label\n" + train)
    (tmp_path / "dev.csv").write_text("text,label\ngood,pos\nbad,neg\nso so,maybe\n")
    out = tmp_path / "out"
    args = ["--model_name_or_path", str(tiny_bert_dir), "--train_file", str(tmp_path / "train.csv"),
            "--validation_file", str(tmp_path / "dev.csv"), "--do_train", "--do_eval", "--output_dir", str(out),
            "--use_cpu", "true", "--disable_tqdm", "true", "--report_to", "none", "--save_strategy", "no",
            "--max_seq_length", "16", "--cache_dir", str(tmp_path / "cache")]
    err = glue_refuses(args, capfd)
    assert err == "error: --validation_file row 3: label 'maybe' never occurs in the training data (its labels: " \
                  "'neg', 'pos'); the model could not predict it"
    assert nothing_trained(out)


@pytest.mark.parametrize("extra, warmup, planned", [
    ([], 4, "4 training steps (--num_train_epochs 1 of 32 examples)"),  # 32 examples / 8 = 4 steps
    (["--num_train_epochs", "2.5"], 10, "10 training steps (--num_train_epochs 2.5 of 32 examples)"),
    (["--gradient_accumulation_steps", "3"], 2, "2 training steps"),  # ceil(4 / 3) per epoch
    (["--max_steps", "3"], 7, "3 training steps (--max_steps 3)"),
])
def test_glue_partition_warmup_at_or_past_the_last_step_is_refused(extra, warmup, planned, tiny_bert_dir, glue_dir,
                                                                   tmp_path, capfd):
    out = tmp_path / "out"
    err = glue_refuses(glue_args(tiny_bert_dir, glue_dir, out, "--moe", "pad", "--partition_warmup_steps",
                                 str(warmup), *extra), capfd)
    assert err.startswith(f"error: --partition_warmup_steps {warmup} is not below the run's {planned}"), err
    assert f"at most {int(planned.split()[0]) - 1}" in err
    assert nothing_trained(out)


def test_glue_planned_steps_match_the_steps_trained(tiny_bert_dir, glue_dir, tmp_path):
    """The last warm-up the check allows really partitions, and the planned steps are the steps trained."""
    from moe.run_glue import main
    from test_run_glue import read_json
    out = tmp_path / "out"
    assert main(glue_args(tiny_bert_dir, glue_dir, out, "--moe", "pad", "--partition_warmup_steps", "1",
                          "--gradient_accumulation_steps", "3", "--partition_iterations", "1")) == 0
    assert read_json(out / "trainer_state.json")["global_step"] == 2
    assert read_json(out / "partition.json")["step"] == 1 and read_json(out / "eval_results.json")["moe"] == "pad"


@pytest.mark.parametrize("task, length, needed", [("sst2", "1", 3), ("sst2", "2", 3), ("mnli", "4", 5)])
def test_glue_max_seq_length_below_the_special_tokens_is_refused(task, length, needed, tiny_bert_dir,
                                                                  make_tiny_bert_dir, glue_dir, tmp_path, capfd):
    out, model = tmp_path / "out", make_tiny_bert_dir(num_labels=3) if task == "mnli" else tiny_bert_dir
    err = glue_refuses(glue_args(model, glue_dir, out, "--max_seq_length", length, task=task), capfd)
    texts = "a pair of texts (premise, hypothesis)" if task == "mnli" else "a text (sentence)"
    assert err == f"error: --max_seq_length {length} leaves no room for the text: the tokenizer adds {needed - 1 - (task == 'mnli')} " \
                  f"special tokens to {texts}, so sequences need at least {needed} tokens (one token per text)"
    assert nothing_trained(out)


def test_glue_max_seq_length_check_lets_every_text_keep_a_token(tiny_bert_dir):
    from transformers import AutoTokenizer
    from moe import glue
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    glue.check_max_seq_length(tokenizer, ("premise", "hypothesis"), 5)
    ids = tokenizer(["the movie was good"], ["it was bad"], max_length=5, truncation=True)["input_ids"][0]
    assert len(ids) == 5 and ids.count(tokenizer.sep_token_id) == 2 and ids[1] != tokenizer.sep_token_id \
        and ids[3] != tokenizer.sep_token_id


@pytest.mark.parametrize("flag, value", [("--seed", str(2**70)), ("--seed", "-1"), ("--data_seed", str(2**32))])
def test_glue_seed_outside_numpys_range_is_refused(flag, value, tiny_bert_dir, glue_dir, tmp_path, capfd):
    out = tmp_path / "out"
    err = glue_refuses(glue_args(tiny_bert_dir, glue_dir, out, flag, value), capfd)
    assert err == f"error: {flag} must be in [0, 2**32 - 1] (numpy's seeds), got {value}"
    assert not out.exists()


@pytest.mark.parametrize("warmup", ["0", "1"])
def test_glue_ratio_without_a_dynamic_position_is_refused_before_training(warmup, tiny_bert_dir, glue_dir,
                                                                          tmp_path, capfd):
    out = tmp_path / "out"
    err = glue_refuses(glue_args(tiny_bert_dir, glue_dir, out, "--moe", "pad", "--dynamic_ratio", "1e-9",
                                 "--partition_warmup_steps", warmup), capfd)
    assert err.startswith("error: --dynamic_ratio 1e-09 would leave no dynamic position in the model (")
    assert "the smallest ratio that keeps one dynamic element per model is " in err
    assert nothing_trained(out)
