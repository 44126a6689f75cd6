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

import numpy as np
import pytest
import torch
from PIL import Image

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
    root, rng = tmp_path_factory.mktemp("images"), np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / f"c{c}" / f"{i}.png")
    return root


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
