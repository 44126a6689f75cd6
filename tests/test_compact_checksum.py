"""Checksums of saved weights: bytes overwritten inside a file (same size, still a structurally valid
safetensors file) are reported as a damaged file instead of being loaded.

* compact exports (:func:`pad.save_compact`) carry a SHA-256 of their tensors in their metadata;
* folders saved by ``MoETrainer`` carry ``checksums.json`` (:mod:`moe.files`).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import pad
from dyconv.main import main as dyconv_main
from pad.compact import CHECKSUM_KEY, GRANULARITY_KEY, export_compact, state_digest
from pad.runtime import IntegrityError
from test_dyconv_compact_eval import pad_args
from test_pad import RoutedLinear, batches, loss_fn, tiny_model
from test_run_glue import base_args
from test_run_glue_files import eval_args, pad_dir, run_cli, tree_digest  # noqa: F401 (pad_dir: a fixture)

torch.set_num_threads(1)


def data_region(data: bytes) -> tuple[int, int]:
    """``(start, end)`` of the tensor bytes of a safetensors file (after the 8-byte length and the header)."""
    (header_length,) = struct.unpack("<Q", data[:8])
    return 8 + header_length, len(data)


def overwritten(data: bytes, offset: int, count: int = 4) -> bytes:
    """``data`` with ``count`` bytes from ``offset`` inverted: the same size, different contents."""
    damaged = bytearray(data)
    for i in range(offset, min(offset + count, len(data))):
        damaged[i] ^= 0xFF
    return bytes(damaged)


def data_offsets(data: bytes) -> list[int]:
    """The first, a middle and the last bytes of the data region."""
    start, end = data_region(data)
    return sorted({start, (start + end) // 2, end - 1})


def saved_compact(path: Path) -> nn.Module:
    model = tiny_model()
    pad.iterative_mode_partition(model, batches(), loss_fn, 0.3, iterations=2)
    pad.save_compact(model, path)
    return model


# ---------------------------------------------------------------- compact exports

def test_compact_file_records_the_digest_of_its_tensors(tmp_path):
    model = saved_compact(tmp_path / "c.safetensors")
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as handle:
        recorded = handle.metadata()[CHECKSUM_KEY]
    assert recorded == state_digest(export_compact(model))
    state = export_compact(model)
    # the digest covers names, dtypes, shapes and bytes, and not the order of the entries
    assert state_digest(dict(reversed(list(state.items())))) == recorded
    renamed = dict(state)
    renamed["x" + next(iter(renamed))] = renamed.pop(next(iter(renamed)))
    key = "0.bank.static_weight"
    for other in (renamed, {**state, key: state[key].double()}, {**state, key: state[key].view(1, -1)},
                  {**state, key: state[key] + 1}):
        assert state_digest(other) != recorded


def test_intact_compact_file_round_trips(tmp_path):
    model = saved_compact(tmp_path / "c.safetensors")
    fresh = nn.Sequential(RoutedLinear(), nn.Tanh(), RoutedLinear())
    pad.load_compact_file(fresh, tmp_path / "c.safetensors")
    x = torch.randn(4, 5)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_overwritten_compact_bytes_are_reported(tmp_path):
    path = tmp_path / "c.safetensors"
    saved_compact(path)
    original = path.read_bytes()
    for offset in data_offsets(original):
        damaged = tmp_path / f"damaged{offset}.safetensors"
        damaged.write_bytes(overwritten(original, offset))
        assert damaged.stat().st_size == path.stat().st_size
        with pytest.raises(ValueError) as err:
            pad.load_compact_file(tiny_model(), damaged)
        assert str(err.value) == f"{damaged}: checksum does not match its contents (damaged file)"


@pytest.mark.parametrize("metadata, missing", [({GRANULARITY_KEY: "element"}, CHECKSUM_KEY),
                                               ({CHECKSUM_KEY: "0" * 64}, GRANULARITY_KEY),
                                               (None, f"{CHECKSUM_KEY} or {GRANULARITY_KEY}")])
def test_compact_file_without_checksum_or_granularity_is_refused(tmp_path, metadata, missing):
    """A file that predates checksums or recorded granularities: nothing tells it from a damaged one."""
    model = tiny_model()
    pad.iterative_mode_partition(model, batches(), loss_fn, 0.3, iterations=2)
    path = tmp_path / "old.safetensors"
    save_file(export_compact(model), path, metadata=metadata)
    with pytest.raises(IntegrityError) as err:
        pad.load_compact_file(nn.Sequential(RoutedLinear(), nn.Tanh(), RoutedLinear()), path)
    assert str(err.value) == (f"compact file {path} predates checksummed compact files (its metadata has no "
                              f"{missing}); export it again from its checkpoint with pad.save_compact")


def test_dyconv_evaluate_of_a_damaged_compact_file(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert dyconv_main(pad_args(image_folder, run)) == 0
    original = (run / "model_compact.safetensors").read_bytes()
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(overwritten(original, data_offsets(original)[1]))
    capsys.readouterr()
    assert dyconv_main(pad_args(image_folder, tmp_path / "eval", "--evaluate", "--resume", str(damaged))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and err[0].endswith(
        f"{damaged}: checksum does not match its contents (damaged file)"), err
    assert not (tmp_path / "eval" / "summary.json").exists()


# ---------------------------------------------------------------- folders saved by MoETrainer

def test_saved_folders_list_their_weight_files(pad_dir):
    for folder in (pad_dir, pad_dir / "checkpoint-1"):
        manifest = json.loads((folder / "checksums.json").read_text())
        weights = sorted(p.name for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern))
        assert sorted(manifest) == weights and "model.safetensors" in weights
        for name, digest in manifest.items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert "model_compact.safetensors" in json.loads((pad_dir / "checksums.json").read_text())


def test_overwritten_model_weights_are_reported(pad_dir, glue_dir, tmp_path, capfd):
    original = (pad_dir / "model.safetensors").read_bytes()
    for offset in data_offsets(original):
        model = tmp_path / f"model{offset}"
        shutil.copytree(pad_dir, model, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
        (model / "model.safetensors").write_bytes(overwritten(original, offset))
        code, errors = run_cli(eval_args(model, glue_dir, tmp_path / f"out{offset}"), capfd)
        assert code == 2 and errors == [
            f"error: {model / 'model.safetensors'}: checksum does not match checksums.json (damaged file)"]
        assert not (tmp_path / f"out{offset}" / "eval_results.json").exists()


def test_intact_saved_folder_evaluates_and_folder_without_manifest_is_refused(pad_dir, glue_dir, tmp_path, capfd):
    code, errors = run_cli(eval_args(pad_dir, glue_dir, tmp_path / "out"), capfd)
    assert code == 0 and errors == [] and (tmp_path / "out" / "eval_results.json").is_file()
    older = tmp_path / "older"  # a folder that predates manifests: nothing tells it from a damaged one
    shutil.copytree(pad_dir, older, ignore=shutil.ignore_patterns("checkpoint-*", "runs", "checksums.json"))
    code, errors = run_cli(eval_args(older, glue_dir, tmp_path / "out_older"), capfd)
    assert code == 2 and errors == [f"error: model folder {older} predates checksummed folders (it has no "
                                    f"checksums.json); train it again with this version of moe/run_glue.py"]
    assert not (tmp_path / "out_older" / "eval_results.json").exists()


def test_damaged_manifest_is_reported(pad_dir, glue_dir, tmp_path, capfd):
    cases = {"[1, 2]": "checksums.json: expected a JSON object, got list",
             '{"model.safetensors": 3}': "checksums.json: entry 'model.safetensors' is not a file name",
             '{"../model.safetensors": "00"}': "entry '../model.safetensors' is not a file name"}
    for i, (content, message) in enumerate(cases.items()):
        model = tmp_path / f"m{i}"
        shutil.copytree(pad_dir, model, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
        (model / "checksums.json").write_text(content)
        code, errors = run_cli(eval_args(model, glue_dir, tmp_path / f"out{i}"), capfd)
        assert code == 2 and len(errors) == 1 and message in errors[0], errors


def test_listed_file_removed_on_purpose_is_not_an_error(pad_dir, glue_dir, tmp_path, capfd):
    """Only config.json and the compact export kept (docs/moe.md): the manifest still lists
    model.safetensors; the folder loads from the compact file, and the compact file is still verified."""
    model = tmp_path / "compact_only"
    shutil.copytree(pad_dir, model, ignore=shutil.ignore_patterns("checkpoint-*", "runs", "model.safetensors"))
    code, errors = run_cli(eval_args(model, glue_dir, tmp_path / "out"), capfd)
    assert code == 0 and errors == []
    compact = model / "model_compact.safetensors"
    original = compact.read_bytes()
    compact.write_bytes(overwritten(original, data_offsets(original)[1]))
    code, errors = run_cli(eval_args(model, glue_dir, tmp_path / "out2"), capfd)
    assert code == 2 and errors == [f"error: {compact}: checksum does not match checksums.json (damaged file)"]
    manifest = json.loads((model / "checksums.json").read_text())
    del manifest["model_compact.safetensors"]  # not listed: the checksum inside the compact file still catches it
    (model / "checksums.json").write_text(json.dumps(manifest))
    code, errors = run_cli(eval_args(model, glue_dir, tmp_path / "out3"), capfd)
    assert code == 2 and len(errors) == 1 and errors[0].endswith(
        f"{compact}: checksum does not match its contents (damaged file)"), errors


def test_resume_from_checkpoint_with_overwritten_weights(pad_dir, glue_dir, tiny_bert_dir, tmp_path, capfd):
    out = tmp_path / "run"
    shutil.copytree(pad_dir, out)
    weights = out / "checkpoint-1" / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(overwritten(original, data_offsets(original)[1]))
    before = tree_digest(out)
    args = base_args(tiny_bert_dir, glue_dir, out, "sst2", "--moe", "pad", "--do_train", "--max_steps", "2",
                     "--resume_from_checkpoint", str(out / "checkpoint-1"))
    code, errors = run_cli(args, capfd)
    assert code == 2 and errors == [f"error: {weights}: checksum does not match checksums.json (damaged file)"]
    assert tree_digest(out) == before  # nothing written, nothing lost
