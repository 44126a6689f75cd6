"""dyconv/main.py --partition-granularity / --partition-batchnorm: the masks IMP makes, what the run
records, and a resumed or re-evaluated run computing with the recorded granularity."""
import json
from pathlib import Path

import pytest
import torch

from pad.mixing import GRANULARITIES, unit_view
from pad.partition import BATCHNORM_MODES
from dyconv import engine
from dyconv.main import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folder(image_folder) -> Path:
    return image_folder


def pad_args(folder, output, *extra) -> list[str]:
    return ["--data", str(folder), "--arch", "resnet10", "--image-size", "32", "--epochs", "1", "--batch-size", "4",
            "--workers", "0", "--output", str(output), "--conv", "dyconv", "--pad", "--dynamic-ratio", "0.3",
            "--partition-iterations", "2", "--partition-batches", "2", *extra]


def read_json(path):
    return json.loads(Path(path).read_text())


def masks(folder_path) -> dict:
    state = engine.load_checkpoint(folder_path / "checkpoint.pt")["model"]
    return {k: v for k, v in state.items() if k.endswith(".mask")}


def structured_at(mask: torch.Tensor, granularity: str) -> bool:
    units = unit_view(mask > 0, granularity)
    return torch.equal(units.all(1), units.any(1))


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory):
    out = {}
    for name, extra in (("element", ()), ("kernel", ("--partition-granularity", "kernel")),
                        ("unit", ("--partition-granularity", "unit")),
                        ("running", ("--partition-batchnorm", "running"))):
        out[name] = tmp_path_factory.mktemp(name)
        assert main(pad_args(folder, out[name], *extra)) == 0
    return out


def test_granularity_flag_structures_the_masks_and_is_recorded(runs):
    element, kernel, unit = masks(runs["element"]), masks(runs["kernel"]), masks(runs["unit"])
    assert not all(structured_at(m, "kernel") for m in element.values())
    assert all(structured_at(m, "kernel") for m in kernel.values())
    assert not all(structured_at(m, "unit") for m in kernel.values())
    assert all(structured_at(m, "unit") for m in unit.values())
    for name, run in runs.items():
        granularity = name if name in ("kernel", "unit") else "element"
        summary = read_json(run / "summary.json")
        assert summary["partition"]["granularity"] == summary["partition_granularity"] == granularity
        assert summary["dynamic_ratio"] == pytest.approx(0.3, abs=0.05)
        assert summary["train_seconds_per_step"] > 0
        assert engine.load_checkpoint(run / "checkpoint.pt")["args"]["partition_granularity"] == granularity
    assert read_json(runs["unit"] / "summary.json")["mask_entries"] == sum(m.shape[0] for m in unit.values())


def test_batchnorm_flag_changes_the_partition_and_is_recorded(runs):
    assert read_json(runs["element"] / "summary.json")["partition"]["batchnorm"] == "batch"
    assert read_json(runs["running"] / "summary.json")["partition"]["batchnorm"] == "running"
    batch, running = masks(runs["element"]), masks(runs["running"])
    assert any(not torch.equal(batch[k], running[k]) for k in batch)
    assert engine.load_checkpoint(runs["running"] / "checkpoint.pt")["args"]["partition_batchnorm"] == "running"


def test_resume_and_evaluate_keep_the_recorded_granularity(runs, folder, tmp_path):
    unit = runs["unit"]
    # resumed without the flag: the checkpoint's unit granularity wins, the masks stay
    assert main(pad_args(folder, tmp_path / "resumed", "--epochs", "2", "--resume", str(unit / "checkpoint.pt"))) == 0
    resumed = read_json(tmp_path / "resumed" / "summary.json")
    assert resumed["partition_granularity"] == "unit" and resumed["partition"]["granularity"] == "unit"
    assert all(torch.equal(m, masks(unit)[k]) for k, m in masks(tmp_path / "resumed").items())
    assert main(pad_args(folder, tmp_path / "eval", "--evaluate", "--resume", str(unit / "checkpoint.pt"))) == 0
    assert read_json(tmp_path / "eval" / "summary.json")["partition_granularity"] == "unit"
    compact = unit / "model_compact.safetensors"
    assert main(pad_args(folder, tmp_path / "compact", "--evaluate", "--resume", str(compact))) == 0
    evaluated = read_json(tmp_path / "compact" / "summary.json")
    assert evaluated["partition_granularity"] == "unit"
    assert evaluated["top1"] == read_json(unit / "summary.json")["top1"]


def test_checkpoint_with_a_granularity_its_masks_do_not_have_is_refused(runs, folder, tmp_path, capsys):
    checkpoint = engine.load_checkpoint(runs["element"] / "checkpoint.pt")
    checkpoint["partition"]["granularity"] = "unit"
    for key in checkpoint["model"]:
        if key.endswith(".granularity_code"):  # what the PAD layers hold of their granularity
            checkpoint["model"][key] = torch.tensor(GRANULARITIES.index("unit"))
    engine.save_checkpoint(checkpoint, tmp_path / "forged.pt")
    capsys.readouterr()
    rc = main(pad_args(folder, tmp_path / "out", "--epochs", "2", "--resume", str(tmp_path / "forged.pt")))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: checkpoint") and "not structured at unit granularity" in err[0]


@pytest.mark.parametrize("flag, choices", [("--partition-granularity", GRANULARITIES),
                                           ("--partition-batchnorm", BATCHNORM_MODES)])
def test_unknown_values_are_refused(flag, choices, folder, tmp_path, capsys):
    rc = main(pad_args(folder, tmp_path, flag, "rows"))
    listed = ", ".join(repr(c) for c in choices)
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [f"error: argument {flag}: invalid choice: 'rows' (choose from {listed})"]


def test_checkpoint_records_the_unit_paths_and_a_resumed_run_keeps_them(runs, folder, tmp_path, capsys):
    checkpoint = engine.load_checkpoint(runs["unit"] / "checkpoint.pt")
    recorded = checkpoint["conv_schemes"]
    paths = {p for entry in recorded.values() for p in entry["paths"].values()}
    assert paths <= {"unit", "element"} and paths  # some layers split (most have static filters)
    assert all(entry["paths"] == {} for entry in engine.load_checkpoint(runs["element"] / "checkpoint.pt")
               ["conv_schemes"].values())  # element masks: nothing to choose
    flipped = {key: "element" if path == "unit" else "unit"
               for key, path in recorded["layer4.0.conv2"]["paths"].items()}
    assert flipped
    recorded["layer4.0.conv2"]["paths"] = flipped  # not what the rule chooses: a restored run must keep it
    engine.save_checkpoint(checkpoint, tmp_path / "flipped.pt")
    assert main(pad_args(folder, tmp_path / "resumed", "--epochs", "2", "--resume", str(tmp_path / "flipped.pt"))) == 0
    resumed = engine.load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["conv_schemes"]
    assert flipped.items() <= resumed["layer4.0.conv2"]["paths"].items()

    recorded["layer4.0.conv2"]["paths"] = {"batch@2x2": "split"}
    engine.save_checkpoint(checkpoint, tmp_path / "bad.pt")
    capsys.readouterr()
    assert main(pad_args(folder, tmp_path / "bad", "--evaluate", "--resume", str(tmp_path / "bad.pt"))) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: checkpoint {tmp_path / 'bad.pt'}: recorded conv path 'split' of layer 'layer4.0.conv2' is unknown; "
        "expected one of ('element', 'unit')"]
