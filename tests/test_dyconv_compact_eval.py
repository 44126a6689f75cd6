"""dyconv/main.py: --conv-scheme, schemes recorded in and restored from checkpoints, --evaluate from the compact file."""
from pathlib import Path

import pytest
import torch

from dyconv.engine import load_checkpoint, save_checkpoint
from dyconv.main import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folder(image_folder) -> Path:
    return image_folder


def pad_args(folder, output, *extra):
    # temperature 1 from the start: the compact file holds no temperature and is evaluated at 1
    return ["--data", str(folder), "--arch", "resnet10", "--image-size", "32", "--epochs", "1", "--batch-size", "4",
            "--workers", "0", "--output", str(output), "--conv", "dyconv", "--pad", "--dynamic-ratio", "0.3",
            "--partition-iterations", "1", "--partition-batches", "1", "--temp-init", "1", "--temp-epochs", "0",
            *extra]


@pytest.fixture(scope="module")
def stacked_run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("stacked_run")
    assert main(pad_args(folder, out, "--conv-scheme", "stacked")) == 0
    return out


def read_json(path):
    import json
    return json.loads(Path(path).read_text())


def test_checkpoint_records_the_forced_scheme(stacked_run):
    recorded = load_checkpoint(stacked_run / "checkpoint.pt")["conv_schemes"]
    assert len(recorded) == 11 and all(entry["policy"] == "stacked" for entry in recorded.values())
    # 3x3 convs ran stacked, 1x1 shortcuts too (stacked is exact there), at batch 4 of 32 px images
    assert recorded["layer1.0.conv1"]["chosen"]["batch@8x8"] == "stacked"
    assert recorded["layer4.0.downsample.0"]["chosen"]["batch@2x2"] == "stacked"


def test_resume_restores_the_recorded_schemes_and_older_checkpoints_are_refused(stacked_run, folder, tmp_path,
                                                                                capsys):
    state = load_checkpoint(stacked_run / "checkpoint.pt")
    assert main(pad_args(folder, tmp_path / "a", "--epochs", "2", "--resume", str(stacked_run / "checkpoint.pt"))) == 0
    resumed = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["conv_schemes"]
    assert all(entry["policy"] == "stacked" for entry in resumed.values())  # not this run's default, auto
    for name, entry in state["conv_schemes"].items():
        assert entry["chosen"].items() <= resumed[name]["chosen"].items()

    no_schemes = {k: v for k, v in state.items() if k != "conv_schemes"}
    no_granularity = {**state, "partition": {k: v for k, v in state["partition"].items() if k != "granularity"},
                      "model": {k: v for k, v in state["model"].items() if not k.endswith(".granularity_code")}}
    cases = [(no_schemes, "predates recorded conv schemes (it holds none)"),
             (no_granularity, "predates PAD layers that record their partition granularity (its model holds no "
                              "granularity_code)")]
    for older, what in cases:
        save_checkpoint(older, tmp_path / "old.pt")
        capsys.readouterr()
        assert main(pad_args(folder, tmp_path / "b", "--evaluate", "--resume", str(tmp_path / "old.pt"))) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: checkpoint {tmp_path / 'old.pt'} {what}; retrain it with this version of dyconv/main.py"]
        assert not (tmp_path / "b" / "summary.json").exists()


def test_a_resume_from_a_checkpoint_without_its_flags_or_random_states_is_refused(stacked_run, folder, tmp_path,
                                                                                   capsys):
    """Training continues a run only from a checkpoint that records its flags and random states: one without
    them predates those records (one error line, nothing written); --evaluate needs neither."""
    state = load_checkpoint(stacked_run / "checkpoint.pt")
    for key, what in (("args", "recorded run arguments"), ("rng", "recorded random states")):
        save_checkpoint({k: v for k, v in state.items() if k != key}, tmp_path / "old.pt")
        capsys.readouterr()
        assert main(pad_args(folder, tmp_path / "b", "--epochs", "2", "--resume", str(tmp_path / "old.pt"))) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: checkpoint {tmp_path / 'old.pt'} predates {what} (it holds none); retrain it with this version "
            f"of dyconv/main.py"]
        assert not (tmp_path / "b" / "checkpoint.pt").exists() and not (tmp_path / "b" / "summary.json").exists()
    assert main(pad_args(folder, tmp_path / "c", "--evaluate", "--resume", str(tmp_path / "old.pt"))) == 0


def test_bad_recorded_schemes_are_one_error_line(stacked_run, folder, tmp_path, capsys):
    state = load_checkpoint(stacked_run / "checkpoint.pt")
    state["conv_schemes"]["layer1.0.conv1"]["chosen"]["batch@8x8"] = "fft"
    save_checkpoint(state, tmp_path / "bad.pt")
    assert main(pad_args(folder, tmp_path / "c", "--evaluate", "--resume", str(tmp_path / "bad.pt"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: checkpoint {tmp_path / 'bad.pt'}: recorded conv scheme 'fft' of layer "
                   "'layer1.0.conv1' is unknown"]


def test_evaluate_from_the_compact_file_reproduces_the_run(stacked_run, folder, tmp_path):
    compact = stacked_run / "model_compact.safetensors"
    assert main(pad_args(folder, tmp_path, "--evaluate", "--resume", str(compact))) == 0
    saved, evaluated = read_json(stacked_run / "summary.json"), read_json(tmp_path / "summary.json")
    assert evaluated["evaluate_only"] is True and evaluated["compact_file"] == str(compact)
    for key in ("top1", "top5", "loss", "dynamic_ratio", "params_compact"):
        assert evaluated[key] == pytest.approx(saved[key], rel=1e-5), key  # float32: folded vs per-pass fold


@pytest.mark.parametrize("extra, message", [
    (["--resume", "x.safetensors"], "a compact .safetensors file can only be evaluated (--evaluate --pad)"),
    (["--evaluate", "--resume", "missing.safetensors"], "compact file missing.safetensors does not exist"),
    (["--conv-scheme", "fft"], "argument --conv-scheme: invalid choice: 'fft'"),
])
def test_bad_compact_and_scheme_flags(folder, tmp_path, capsys, extra, message):
    assert main(pad_args(folder, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_compact_file_of_another_architecture(stacked_run, folder, tmp_path, capsys):
    args = pad_args(folder, tmp_path, "--evaluate", "--resume", str(stacked_run / "model_compact.safetensors"))
    args[args.index("resnet10")] = "resnet18"
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: compact file ") and "does not fit resnet18/dyconv" in err[0]
