"""moe/run_glue.py against damaged files: every file it reads is accepted or rejected with exactly
one ``error:`` line naming the file and exit status 2, never a traceback, and a rejected run
writes nothing.  The damaged files are generated here: empty, random bytes of several lengths,
truncations at several offsets."""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from moe import files
from moe.run_glue import main
from test_run_glue import base_args, write_tsv

RANDOM_LENGTHS = (1, 9, 100, 5000)


def damaged_versions(data: bytes, seed: int = 0) -> dict[str, bytes]:
    """``{label: bytes}``: empty, random bytes of :data:`RANDOM_LENGTHS`, and ``data`` truncated
    at 1, 8, a third, a half and all but one byte."""
    rng = random.Random(seed)
    versions = {"empty": b""}
    versions.update({f"random{n}": rng.randbytes(n) for n in RANDOM_LENGTHS})
    for offset in sorted({1, 8, len(data) // 3, len(data) // 2, len(data) - 1}):
        versions[f"cut{offset}"] = data[:offset]
    return versions


def run_cli(args, capfd) -> tuple[int, list[str]]:
    """``(exit status, error lines on stderr)``; an exception escaping ``main`` fails the test."""
    capfd.readouterr()
    code = main(args)
    err = capfd.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error")]


def check_outcome(code: int, errors: list[str], file_name: str, must_fail: bool) -> None:
    """Accepted (exit 0, no error) or rejected with one ``error:`` line naming ``file_name``, exit 2."""
    if must_fail or code != 0:
        assert code == 2, (code, errors)
        assert len(errors) == 1 and errors[0].startswith("error: ") and file_name in errors[0], errors
    else:
        assert errors == []


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pad_dir(tiny_bert_dir, glue_dir, tmp_path_factory):
    """A PAD-MoE output folder (one training step, with a checkpoint at step 1)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("pad_saved")
    args = base_args(tiny_bert_dir, glue_dir, out, "sst2", "--moe", "pad", "--do_train", "--max_steps", "1",
                     "--overwrite_output_dir", "true")
    args[args.index("--save_strategy") + 1] = "steps"
    assert main(args + ["--save_steps", "1"]) == 0
    return out


def eval_args(model_dir, glue_dir, out):
    return base_args(model_dir, glue_dir, out, "sst2", "--do_eval", "--max_eval_samples", "4")


# ---------------------------------------------------------------- model folders

@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "partition.json", "tokenizer.json",
                                  "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"])
def test_damaged_model_folder_file(name, pad_dir, glue_dir, tmp_path, capfd):
    original = (pad_dir / name).read_bytes()
    for label, content in damaged_versions(original).items():
        model = tmp_path / f"model_{label}"
        shutil.copytree(pad_dir, model, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
        (model / name).write_bytes(content)
        code, errors = run_cli(eval_args(model, glue_dir, tmp_path / f"out_{label}"), capfd)
        # safetensors and JSON files are never valid once damaged (a cut of the trailing newline
        # of a JSON file is the one exception); vocab.txt only matters when it is not UTF-8
        must_fail = name == "model.safetensors" or (name.endswith(".json") and label != f"cut{len(original) - 1}")
        if name == "vocab.txt":
            must_fail = label.startswith("random") and not _is_utf8(content)
        check_outcome(code, errors, name, must_fail)
        if code == 2:
            assert not (tmp_path / f"out_{label}" / "eval_results.json").exists()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_dense_model_weights_damaged(tiny_bert_dir, glue_dir, tmp_path, capfd):
    """A dense hub-style folder (AutoModel.from_pretrained path) with a damaged model.safetensors."""
    original = (tiny_bert_dir / "model.safetensors").read_bytes()
    for label, content in damaged_versions(original, seed=1).items():
        model = tmp_path / f"dense_{label}"
        shutil.copytree(tiny_bert_dir, model)
        (model / "model.safetensors").write_bytes(content)
        code, errors = run_cli(eval_args(model, glue_dir, tmp_path / f"out_{label}"), capfd)
        check_outcome(code, errors, "model.safetensors", must_fail=True)
        assert "not a complete safetensors file" in errors[0]


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.safetensors.index.json"])
def test_other_weight_files_damaged(name, tiny_bert_dir, glue_dir, tmp_path, capfd):
    """pytorch_model.bin (torch.save zip) and a sharded index beside the weights: checked too."""
    import io
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(64)}, buffer)
    original = buffer.getvalue() if name.endswith(".bin") else b'{"metadata": {}, "weight_map": {}}\n'
    for label, content in damaged_versions(original, seed=2).items():
        model = tmp_path / f"m_{label}"
        shutil.copytree(tiny_bert_dir, model)
        (model / name).write_bytes(content)
        code, errors = run_cli(eval_args(model, glue_dir, tmp_path / f"out_{label}"), capfd)
        check_outcome(code, errors, name, must_fail=label != f"cut{len(original) - 1}")


def test_config_foreign_structures(pad_dir, glue_dir, tmp_path, capfd):
    cases = {"a list": ([1, 2], "config.json: expected a JSON object, got list"),
             "moe not a mapping": ({"moe": 3}, "config.json: 'moe' must be an object"),
             "unknown moe type": ({"moe": {"moe": "dense"}}, "config.json: 'moe' must be an object")}
    config = json.loads((pad_dir / "config.json").read_text())
    for i, (case, (change, message)) in enumerate(cases.items()):
        model = tmp_path / f"m{i}"
        shutil.copytree(pad_dir, model, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
        value = change if isinstance(change, list) else {**config, **change}
        (model / "config.json").write_text(json.dumps(value))
        code, errors = run_cli(eval_args(model, glue_dir, tmp_path / f"o{i}"), capfd)
        assert code == 2 and len(errors) == 1 and message in errors[0], (case, errors)


def test_non_finite_weights_rejected(pad_dir, glue_dir, tmp_path, capfd):
    from safetensors.torch import load_file, save_file
    model = tmp_path / "nan"
    shutil.copytree(pad_dir, model, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    state = load_file(str(model / "model.safetensors"))
    state["classifier.bias"][1] = float("nan")
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    files.write_checksums(str(model))  # a consistent folder: only the values are bad
    code, errors = run_cli(eval_args(model, glue_dir, tmp_path / "o"), capfd)
    assert code == 2 and errors == [f"error: {model}: non-finite values in classifier.bias"]


def test_directory_in_place_of_a_file(pad_dir, glue_dir, tmp_path, capfd):
    model = tmp_path / "m"
    shutil.copytree(pad_dir, model, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").mkdir()
    code, errors = run_cli(eval_args(model, glue_dir, tmp_path / "o"), capfd)
    assert code == 2 and errors == [f"error: {model / 'model.safetensors'}: is a directory, expected a file"]


# ---------------------------------------------------------------- the leading *.json arguments file

def test_damaged_arguments_file(tiny_bert_dir, glue_dir, tmp_path, capfd):
    original = json.dumps({"moe": "moe", "do_eval": True, "max_eval_samples": 4}).encode()
    for label, content in damaged_versions(original, seed=3).items():
        config = tmp_path / f"args_{label}.json"
        config.write_bytes(content)
        code, errors = run_cli([str(config)] + eval_args(tiny_bert_dir, glue_dir, tmp_path / f"o_{label}"), capfd)
        check_outcome(code, errors, config.name, must_fail=True)
    for value, message in (([1], "expected a JSON object, got list"),
                           ({"moe": {"x": 1}}, "the value of 'moe' must be a number, a string or a list of them")):
        config = tmp_path / "shape.json"
        config.write_text(json.dumps(value))
        code, errors = run_cli([str(config)] + eval_args(tiny_bert_dir, glue_dir, tmp_path / "o"), capfd)
        assert code == 2 and errors == [f"error: {config}: {message}"]


# ---------------------------------------------------------------- checkpoints resumed from

@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                                  "trainer_state.json", "partition.json"])
def test_damaged_checkpoint_file(name, pad_dir, glue_dir, tiny_bert_dir, tmp_path, capfd):
    original = (pad_dir / "checkpoint-1" / name).read_bytes()
    versions = damaged_versions(original, seed=4)
    for label in ("empty", "random100", "random5000", f"cut{len(original) // 2}"):
        out = tmp_path / f"run_{label}"
        shutil.copytree(pad_dir, out)
        (out / "checkpoint-1" / name).write_bytes(versions[label])
        before = tree_digest(out)
        args = base_args(tiny_bert_dir, glue_dir, out, "sst2", "--moe", "pad", "--do_train", "--max_steps", "2",
                         "--resume_from_checkpoint", str(out / "checkpoint-1"))
        code, errors = run_cli(args, capfd)
        check_outcome(code, errors, f"checkpoint-1/{name}", must_fail=True)
        assert tree_digest(out) == before  # nothing written, nothing lost


def test_resume_from_missing_folder(tiny_bert_dir, glue_dir, tmp_path, capfd):
    args = base_args(tiny_bert_dir, glue_dir, tmp_path / "o", "sst2", "--do_train",
                     "--resume_from_checkpoint", str(tmp_path / "nowhere"))
    code, errors = run_cli(args, capfd)
    assert code == 2 and errors == [f"error: --resume_from_checkpoint {tmp_path / 'nowhere'}: no such folder"]


# ---------------------------------------------------------------- data files

def test_damaged_glue_tsv(tiny_bert_dir, glue_dir, tmp_path, capfd):
    original = (glue_dir / "SST-2" / "dev.tsv").read_bytes()
    for label, content in damaged_versions(original, seed=5).items():
        data = tmp_path / f"glue_{label}"
        shutil.copytree(glue_dir / "SST-2", data / "SST-2")
        (data / "SST-2" / "dev.tsv").write_bytes(content)
        code, errors = run_cli(eval_args(tiny_bert_dir, data, tmp_path / f"o_{label}"), capfd)
        # a cut inside the header or a row is rejected; a cut of the last newline is a complete file
        check_outcome(code, errors, "dev.tsv", must_fail=label != f"cut{len(original) - 1}")


@pytest.mark.parametrize("extension", ["csv", "json"])
def test_damaged_csv_json_files(extension, tiny_bert_dir, glue_dir, tmp_path, capfd):
    rows = [("good great movie", 1), ("bad film", 0)] * 4
    if extension == "csv":
        original = ("sentence,label\n" + "".join(f"{s},{y}\n" for s, y in rows)).encode()
    else:
        original = "".join(json.dumps({"sentence": s, "label": y}) + "\n" for s, y in rows).encode()
    for label, content in damaged_versions(original, seed=6).items():
        path = tmp_path / f"dev_{label}.{extension}"
        path.write_bytes(content)
        args = ["--model_name_or_path", str(tiny_bert_dir), "--task_name", "sst2", "--validation_file", str(path),
                "--do_eval", "--output_dir", str(tmp_path / f"o_{label}"), "--cache_dir", str(tmp_path / "cache"),
                "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--max_seq_length", "16"]
        code, errors = run_cli(args, capfd)
        check_outcome(code, errors, path.name, must_fail=label in ("empty", "random100", "random5000", "cut8"))


def test_stsb_bad_scores_in_glue_dir(make_tiny_bert_dir, glue_dir, tmp_path, capfd):
    model = make_tiny_bert_dir(num_labels=1)
    header = (glue_dir / "STS-B" / "dev.tsv").read_text().splitlines()[0].split("\t")
    for i, score in enumerate(("nan", "inf", "-1", "5.5")):
        data = tmp_path / f"g{i}"
        rows = [[0, "main", "f", "2012", 0, "none", "none", "a movie", "the film", "3.0"],
                [1, "main", "f", "2012", 1, "none", "none", "a film", "the movie", score]]
        write_tsv(data / "STS-B" / "dev.tsv", header, rows)
        args = base_args(model, data, tmp_path / f"o{i}", "stsb", "--do_eval")
        code, errors = run_cli(args, capfd)
        assert code == 2 and errors == [
            f"error: {data / 'STS-B' / 'dev.tsv'} line 3: score {score!r} is not within [0, 5]"]


def test_checkpoint_partition_report_of_another_shape(pad_dir, glue_dir, tiny_bert_dir, tmp_path, capfd):
    out = tmp_path / "run"
    shutil.copytree(pad_dir, out)
    report = out / "checkpoint-1" / "partition.json"
    report.write_text(json.dumps({"target": 0.5, "achieved": 0.5}))
    args = base_args(tiny_bert_dir, glue_dir, out, "sst2", "--moe", "pad", "--do_train", "--max_steps", "2",
                     "--resume_from_checkpoint", str(out / "checkpoint-1"))
    code, errors = run_cli(args, capfd)
    assert code == 2 and errors == [f"error: {report}: not a partition report "
                                    "(missing criterion, schedule, scope, iterations, batches, step)"]
