"""moe/run_glue.py --partition_granularity: the masks IMP makes, what the run records
(all_results.json, partition.json, config.json), and reload / resume keeping the recorded granularity."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from pad.mixing import weight_banks
from moe.modeling import load_model
from moe.run_glue import main
from test_run_glue import base_args, masks, read_json

torch.set_num_threads(1)


def pad_args(model, glue_dir, out, *extra):
    args = base_args(model, glue_dir, out, "sst2", "--moe", "pad", "--do_train", "--do_eval", "--max_steps", "4",
                     "--save_steps", "2", "--partition_warmup_steps", "1", *extra)
    args[args.index("--save_strategy") + 1] = "steps"
    return args


def structured_by_rows(mask: torch.Tensor) -> bool:
    rows = mask > 0
    return torch.equal(rows.all(1), rows.any(1))


@pytest.fixture(scope="module")
def runs(tiny_bert_dir, glue_dir, tmp_path_factory):
    out = {}
    for name, extra in (("element", ()), ("unit", ("--partition_granularity", "unit"))):
        out[name] = tmp_path_factory.mktemp(name)
        assert main(pad_args(tiny_bert_dir, glue_dir, out[name], *extra)) == 0
    return out


def test_granularity_flag_structures_the_masks_and_is_recorded(runs):
    assert all(structured_by_rows(m) for m in masks(runs["unit"]).values())
    assert not all(structured_by_rows(m) for m in masks(runs["element"]).values())
    for name, run in runs.items():
        granularity = "unit" if name == "unit" else "element"
        assert read_json(run / "all_results.json")["partition_granularity"] == granularity
        assert read_json(run / "partition.json")["granularity"] == granularity
        assert read_json(run / "config.json")["moe"]["partition_granularity"] == granularity
        assert read_json(run / "all_results.json")["dynamic_ratio"] == pytest.approx(0.5, abs=0.05)
        assert read_json(run / "all_results.json")["partition_decided_by"] == \
            read_json(run / "partition.json")["decided_by"]
        assert read_json(run / "partition.json")["decided_by"].startswith("taylor")


def test_batchnorm_has_no_flag_for_bert(tiny_bert_dir, glue_dir, tmp_path, capfd):
    """BERT has no BatchNorm, so IMP's BatchNorm mode cannot change a GLUE partition: no flag for it."""
    capfd.readouterr()
    assert main(pad_args(tiny_bert_dir, glue_dir, tmp_path / "out", "--partition_batchnorm", "running")) == 2
    assert "--partition_batchnorm" in capfd.readouterr().err


def test_reloaded_model_keeps_the_granularity(runs, glue_dir, tmp_path):
    unit = runs["unit"]
    model = load_model(unit, AutoConfig.from_pretrained(unit))
    assert {b.granularity for _, b in weight_banks(model)} == {"unit"}
    assert any(m.unit_split() is not None for m in model.modules() if hasattr(m, "unit_split"))
    # evaluating the saved model again gives the metrics of the run
    assert main(base_args(unit, glue_dir, tmp_path / "eval", "sst2", "--do_eval")) == 0
    assert read_json(tmp_path / "eval" / "eval_results.json")["eval_accuracy"] == \
        read_json(unit / "eval_results.json")["eval_accuracy"]


def test_resume_without_the_flag_keeps_the_checkpoints_granularity(runs, tiny_bert_dir, glue_dir, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["unit"] / "checkpoint-2", resumed / "checkpoint-2")
    assert main(pad_args(tiny_bert_dir, glue_dir, resumed, "--resume_from_checkpoint",
                         str(resumed / "checkpoint-2"))) == 0
    assert read_json(resumed / "all_results.json")["partition_granularity"] == "unit"
    assert read_json(resumed / "config.json")["moe"]["partition_granularity"] == "unit"
    for key, mask in masks(resumed).items():
        assert torch.equal(mask, masks(runs["unit"])[key])


def test_saved_masks_that_do_not_match_the_recorded_granularity_are_refused(runs, glue_dir, tmp_path, capfd):
    forged = tmp_path / "forged"
    shutil.copytree(runs["element"], forged)
    config = read_json(forged / "config.json")
    config["moe"]["partition_granularity"] = "unit"
    (forged / "config.json").write_text(__import__("json").dumps(config))
    capfd.readouterr()
    assert main(base_args(forged, glue_dir, tmp_path / "out", "sst2", "--do_eval")) == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "do not match config.moe's partition granularity" in errors[0]


def without_granularity(source: Path, folder: Path) -> Path:
    """A copy of the model folder ``source`` as the format before it recorded each PAD layer's granularity: its
    weights without ``granularity_code`` (checksums written again, so only that tells it apart)."""
    from safetensors.torch import load_file, save_file
    from moe import files
    shutil.copytree(source, folder)
    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.endswith(".granularity_code")}, folder / "model.safetensors",
              metadata={"format": "pt"})
    files.write_checksums(str(folder))
    return folder


def test_weights_that_predate_recorded_granularities_are_refused(runs, tiny_bert_dir, glue_dir, tmp_path, capfd):
    older = without_granularity(runs["unit"], tmp_path / "older")
    checkpoint = without_granularity(runs["unit"] / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    predates = ("predates PAD layers that record their partition granularity (its weights hold no granularity_code); "
                "train it again with this version of moe/run_glue.py")
    for args, expected in [(base_args(older, glue_dir, tmp_path / "out", "sst2", "--do_eval"),
                            f"error: model folder {older} {predates}"),
                           (pad_args(tiny_bert_dir, glue_dir, tmp_path / "resumed", "--resume_from_checkpoint",
                                     str(checkpoint)), f"error: checkpoint {checkpoint} {predates}")]:
        capfd.readouterr()
        assert main(args) == 2
        assert [line for line in capfd.readouterr().err.splitlines() if line.startswith("error")] == [expected]


@pytest.mark.parametrize("flag, value, message", [
    ("--partition_granularity", "kernel", "error: argument --partition_granularity/--partition-granularity: "
                                          "invalid choice: 'kernel' (choose from 'element', 'unit')"),
])
def test_bad_values_are_one_error_line(flag, value, message, tiny_bert_dir, glue_dir, tmp_path, capfd):
    capfd.readouterr()
    assert main(pad_args(tiny_bert_dir, glue_dir, tmp_path / "out", flag, value)) == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error")]
    assert errors == [message]
