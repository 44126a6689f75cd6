"""Shared fixtures: a tiny random BERT saved like a hub checkpoint, built offline.

``tiny_bert_dir`` is a directory that ``AutoModelForSequenceClassification``
and ``AutoTokenizer`` load with ``from_pretrained`` and no network:
a 2-layer, 32-hidden ``BertForSequenceClassification`` (2 labels, random
weights, seed 0) plus a WordPiece ``vocab.txt`` and the tokenizer files
``save_pretrained`` writes.  The vocabulary holds the special tokens, some
common words, every lowercase letter and digit and their ``##`` continuations,
so any lowercase ASCII text tokenizes without falling back to ``[UNK]`` for
whole words.

Subprocesses the tests start (``python dyconv/main.py``, ``python moe/run_glue.py``, torchrun, the
scripts) import the packages of this checkout, whatever the environment has installed: ``PYTHONPATH``
starts with the repository root.
"""
from __future__ import annotations

import contextlib
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pad.runtime

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "is", "was", "not", "good", "bad", "movie", "film", "great", "and", "it", "of", "to"]
PUNCTUATION = list(".,!?'\"-:;()")


def tiny_vocab() -> list[str]:
    chars = list(string.ascii_lowercase) + list(string.digits)
    return SPECIAL_TOKENS + WORDS + PUNCTUATION + chars + [f"##{c}" for c in chars]


def tiny_bert_config(num_labels: int = 2, **overrides):
    """A ``BertConfig`` small enough for CPU tests (hidden 32, 2 layers, 4 heads, FFN 64)."""
    from transformers import BertConfig
    settings = dict(vocab_size=len(tiny_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    settings.update(overrides)
    return BertConfig(**settings)


def save_tiny_bert(path: Path, num_labels: int = 2, seed: int = 0, **overrides) -> Path:
    """Writes a random tiny ``BertForSequenceClassification`` and its tokenizer to ``path``."""
    import torch
    from transformers import BertForSequenceClassification, BertTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_file = path / "vocab.txt"
    vocab_file.write_text("\n".join(tiny_vocab()) + "\n")
    BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True).save_pretrained(path)
    torch.manual_seed(seed)
    BertForSequenceClassification(tiny_bert_config(num_labels, **overrides)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A saved tiny BERT (2 labels) with its tokenizer; shared by the session, do not modify it."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture
def make_tiny_bert_dir(tmp_path):
    """Factory: ``make_tiny_bert_dir(num_labels=2, seed=0, **config overrides) -> Path`` (a fresh dir)."""
    counter = iter(range(1_000_000))

    def make(num_labels: int = 2, seed: int = 0, **overrides) -> Path:
        return save_tiny_bert(tmp_path / f"tiny_bert_{next(counter)}", num_labels, seed, **overrides)

    return make


@pytest.fixture
def float64():
    """Double precision as the default dtype for one test (exact comparisons), restored after."""
    import torch
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def write_image_folder(root: Path, classes: int = 3, train: int = 8, val: int = 4, size: int = 32, seed: int = 0) -> Path:
    """An ImageNet-layout folder ``root/{train,val}/c<k>/<i>.png`` of random ``size`` x ``size`` RGB images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """``write_image_folder`` with its defaults: 3 classes, 8 train and 4 val random 32x32 images per class."""
    return write_image_folder(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    """A GLUE folder from ``test_run_glue.make_glue_dir`` (SST-2 with 32 training examples, MNLI, STS-B), one per
    test module."""
    from test_run_glue import make_glue_dir
    return make_glue_dir(tmp_path_factory.mktemp("glue"))


def randomize_attention(layer) -> None:
    """Gives a dynamic conv's attention random BN statistics and Linear weights of order one (call under
    ``torch.no_grad()``), so that its routing is far from uniform."""
    for module in layer.attention.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
        if isinstance(module, torch.nn.Linear):
            module.weight.normal_()


@contextlib.contextmanager
def folder_locked_by_another_process(folder: Path):
    """A child process that holds ``pad.runtime.lock_folder(folder)`` until the block ends (then it is killed,
    which releases the lock); yields the child's ``Popen``."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; import pad.runtime as r; "
                               "h = r.lock_folder(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
                               str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def fail_writes_to(monkeypatch, names: tuple, errno_: int) -> None:
    """Every write to the temporary file of one of ``names`` fails with ``errno_`` (pad.runtime.atomic_write)."""
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if any(Path(path).name == name + ".tmp" for name in names):
            def write(data):
                raise OSError(errno_, os.strerror(errno_))
            handle.write = write
        return handle
    monkeypatch.setattr(pad.runtime, "open", failing_open, raising=False)
