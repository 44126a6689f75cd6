"""End to end: dyconv/main.py on a tiny ImageFolder (3 classes, 32 px PNGs made here), plus its flags,
YAML configs, schedules, checkpoints, torchrun, and bad input."""
import hashlib
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import write_image_folder
from pad.runtime import code_version, machine_description
from dyconv import engine
from dyconv.main import main, parse_args

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

TRAIN_PER_CLASS, BATCH = 8, 4
STEPS_PER_EPOCH = 3 * TRAIN_PER_CLASS // BATCH  # drop_last; 24 images / 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """DIR/{train,val}/c{0,1,2}/*.png: 8 train and 4 val random 32x32 images per class."""
    return write_image_folder(tmp_path_factory.mktemp("imagenet"), classes=3, train=TRAIN_PER_CLASS, val=4)


def base_args(folder, output, *extra) -> list[str]:
    return ["--data", str(folder), "--arch", "resnet10", "--image-size", "32", "--epochs", "1",
            "--batch-size", str(BATCH), "--workers", "0", "--output", str(output), *extra]


def pad_args(folder, output, *extra) -> list[str]:
    return base_args(folder, output, "--conv", "dyconv", "--pad", "--dynamic-ratio", "0.3",
                     "--partition-iterations", "2", "--partition-batches", "2", *extra)


def static_args(folder, output, *extra) -> list[str]:
    return base_args(folder, output, "--conv", "static", *extra)


def read_json(path):
    import json
    return json.loads(Path(path).read_text())


def masks(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith(".mask")}


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pad_run(folder, tmp_path_factory):
    """One PAD-DY-Conv epoch (ratio 0.3), temperature 10 -> 1 over 2 epochs."""
    out = tmp_path_factory.mktemp("pad_run")
    rc = main(pad_args(folder, out, "--temp-init", "10", "--temp-epochs", "2"))
    assert rc == 0
    return out


def scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ---------------------------------------------------------------- a full PAD run

def test_pad_run_writes_outputs_with_target_ratio(pad_run):
    summary = read_json(pad_run / "summary.json")
    checkpoint = engine.load_checkpoint(pad_run / "checkpoint.pt")
    assert engine.load_checkpoint(pad_run / "best.pt")["epoch"] == 1
    layer_masks = masks(checkpoint["model"])
    entries = sum(m.numel() for m in layer_masks.values())
    dynamic = sum(float(m.sum()) for m in layer_masks.values())
    assert summary["mask_entries"] == entries
    assert summary["dynamic_ratio"] == pytest.approx(dynamic / entries, abs=1e-12)
    assert abs(dynamic - 0.3 * entries) <= len(layer_masks)  # within one position per layer
    # stored parameters: compact keeps (1 - M) of W_s and M of each of the K kernels
    params = {k: v for k, v in checkpoint["model"].items() if not k.endswith((".mask", ".granularity_code",
                                                                               "running_mean", "running_var",
                                                                               "num_batches_tracked"))}
    dense = sum(v.numel() for v in params.values())
    unused = sum(float(m.sum()) + float((1 - m).sum()) * 4 for m in layer_masks.values())
    assert summary["params_dense"] == dense and summary["params_compact"] == dense - unused
    assert summary["partition"]["target"] == 0.3 and summary["partition"]["iterations"] == 2
    assert summary["pad"] is True and summary["arch"] == "resnet10" and summary["epochs"] == 1
    assert summary["flops"] > 0 and summary["wall_seconds"] > 0 and summary["steps"] == STEPS_PER_EPOCH
    assert 0 <= summary["top1"] <= summary["top5"] <= 100
    assert set(summary["scale_factors"]) == {k[:-len(".mask")] for k in layer_masks}
    assert (pad_run / "model_compact.safetensors").stat().st_size > 0
    # temperature after the last iteration of epoch 1, annealing 10 -> 1 over 2 epochs
    last = STEPS_PER_EPOCH - 1
    assert checkpoint["temperature"] == pytest.approx(10 + (1 - 10) * last / (2 * STEPS_PER_EPOCH))


def test_tensorboard_events(pad_run):
    tb = pad_run / "tb"
    assert list(tb.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/temperature", "val/top1", "val/top5", "val/loss",
            "pad/dynamic_ratio", "pad/lambda_d_mean", "pad/lambda_s_mean"} <= tags
    assert {"pad/lambda_d", "pad/lambda_s"} <= set(acc.Tags()["histograms"])
    temperatures = [v for _, v in scalars(tb, "train/temperature")]
    expected = [10 + (1 - 10) * s / (2 * STEPS_PER_EPOCH) for s in range(STEPS_PER_EPOCH)]
    assert temperatures == pytest.approx(expected, rel=1e-6)


def test_resume_continues_without_repartition(pad_run, folder, tmp_path, capsys):
    first = engine.load_checkpoint(pad_run / "checkpoint.pt")
    capsys.readouterr()
    rc = main(pad_args(folder, tmp_path, "--temp-init", "10", "--temp-epochs", "2", "--epochs", "2",
                       "--resume", str(pad_run / "checkpoint.pt")))
    assert rc == 0
    assert "IMP" not in capsys.readouterr().out
    second = engine.load_checkpoint(tmp_path / "checkpoint.pt")
    assert second["epoch"] == 2 and second["step"] == 2 * STEPS_PER_EPOCH
    for key, mask in masks(first["model"]).items():
        assert torch.equal(mask, second["model"][key])
    changed = [k for k in first["model"] if k.endswith("bank.kernels")
               and not torch.equal(first["model"][k], second["model"][k])]
    assert changed, "resuming trained no further"
    summary = read_json(tmp_path / "summary.json")
    assert summary["epochs"] == 2 and summary["partition"] == read_json(pad_run / "summary.json")["partition"]
    temperatures = scalars(tmp_path / "tb", "train/temperature")
    assert [s for s, _ in temperatures] == list(range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH))


def test_evaluate_reproduces_saved_top1(pad_run, folder, tmp_path):
    rc = main(pad_args(folder, tmp_path, "--evaluate", "--resume", str(pad_run / "checkpoint.pt")))
    assert rc == 0
    saved, evaluated = read_json(pad_run / "summary.json"), read_json(tmp_path / "summary.json")
    assert evaluated["evaluate_only"] is True and not (tmp_path / "checkpoint.pt").exists()
    for key in ("top1", "top5", "loss", "dynamic_ratio", "params_compact"):
        assert evaluated[key] == pytest.approx(saved[key], abs=1e-6), key


def test_torchrun_two_processes_on_cpu(folder, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dyconv/main.py",
           *pad_args(folder, tmp_path, "--partition-iterations", "1", "--partition-batches", "1")]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = read_json(tmp_path / "summary.json")
    assert summary["world_size"] == 2 and summary["steps"] == 12 // BATCH  # 12 images per rank
    assert summary["dynamic_ratio"] == pytest.approx(0.3, abs=1e-3)
    assert result.stdout.count("IMP taylor") == 1  # partitioned on rank 0 only


# ---------------------------------------------------------------- flags reach the run

def test_partition_flags_reach_imp(folder, tmp_path):
    rc = main(base_args(folder, tmp_path, "--conv", "dyconv", "--pad", "--dynamic-ratio", "0.5", "--kernels", "2",
                        "--scale-factors", "none", "--partition-criterion", "random", "--partition-schedule", "linear",
                        "--partition-scope", "local", "--partition-iterations", "3", "--partition-batches", "1"))
    assert rc == 0
    summary = read_json(tmp_path / "summary.json")
    report = summary["partition"]
    assert (report["criterion"], report["schedule"], report["scope"], report["iterations"], report["batches"]) == \
        ("random", "linear", "local", 3, 1)
    assert report["ratio_per_iteration"] == pytest.approx([1 - 0.5 * t / 3 for t in (1, 2, 3)], abs=1e-3)
    state = engine.load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    for key, mask in masks(state).items():  # local scope: every layer on its own hits the ratio
        assert abs(float(mask.sum()) - 0.5 * mask.numel()) <= 1, key
        assert state[key.replace(".mask", ".kernels")].shape[0] == 2
    assert not any(k.endswith(".phi") for k in state)
    assert all(v == {"lambda_d": 1.0, "lambda_s": 1.0} for v in summary["scale_factors"].values())


def test_train_and_val_subsets_limit_the_run(folder, tmp_path):
    assert main(static_args(folder, tmp_path, "--train-subset", "8", "--val-subset", "5", "--epochs", "2")) == 0
    summary = read_json(tmp_path / "summary.json")
    assert (summary["train_samples"], summary["val_samples"], summary["steps"]) == (8, 5, 2 * 8 // BATCH)
    assert summary["dynamic_ratio"] is None and summary["partition"] is None
    assert not (tmp_path / "model_compact.safetensors").exists()


def test_no_save_checkpoints_writes_the_results_but_nothing_to_resume_from(folder, tmp_path):
    assert main(pad_args(folder, tmp_path, "--no-save-checkpoints", "--epochs", "2")) == 0
    summary = read_json(tmp_path / "summary.json")
    assert summary["epochs"] == 2 and summary["steps"] == 2 * STEPS_PER_EPOCH and summary["pad"] is True
    assert (tmp_path / "model_compact.safetensors").stat().st_size > 0 and list((tmp_path / "tb").iterdir())
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "best.pt").exists()
    # replacing a run that has checkpoints: they go with it, so the folder never pairs one run's checkpoint
    # with another run's summary
    assert main(static_args(folder, tmp_path / "replaced")) == 0
    assert (tmp_path / "replaced" / "checkpoint.pt").exists()
    assert main(static_args(folder, tmp_path / "replaced", "--no-save-checkpoints", "--overwrite-output-dir",
                            "--seed", "1")) == 0
    assert read_json(tmp_path / "replaced" / "summary.json")["seed"] == 1
    assert not (tmp_path / "replaced" / "checkpoint.pt").exists() and not (tmp_path / "replaced" / "best.pt").exists()


def test_lr_schedule_warmup_and_momentum_reach_the_optimizer(folder, tmp_path):
    rc = main(static_args(folder, tmp_path, "--epochs", "2", "--lr", "0.2", "--lr-schedule", "step",
                          "--warmup-epochs", "1", "--momentum", "0.5", "--weight-decay", "0.01"))
    assert rc == 0
    total = 2 * STEPS_PER_EPOCH
    lrs = [v for _, v in scalars(tmp_path / "tb", "train/lr")]
    expected = []
    for s in range(total):
        if s < STEPS_PER_EPOCH:
            expected.append(0.2 * (s + 1) / STEPS_PER_EPOCH)
        else:
            expected.append(0.2 * 0.1 ** sum(s / total >= m for m in (0.3, 0.6, 0.9)))
    assert lrs == pytest.approx(expected, rel=1e-6)
    groups = engine.load_checkpoint(tmp_path / "checkpoint.pt")["optimizer"]["param_groups"]
    assert [g["momentum"] for g in groups] == [0.5, 0.5] and [g["weight_decay"] for g in groups] == [0.01, 0.0]


def test_step_and_cosine_schedules_differ():
    cosine = [engine.learning_rate(s, 100, 0.1, "cosine") for s in range(100)]
    step = [engine.learning_rate(s, 100, 0.1, "step") for s in range(100)]
    assert cosine[0] == step[0] == 0.1
    assert cosine[50] == pytest.approx(0.05) and step[50] == pytest.approx(0.01)
    assert step[29] == 0.1 and step[30] == pytest.approx(0.01) and step[90] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    assert [engine.learning_rate(s, 100, 0.1, "cosine", warmup_steps=4) for s in range(4)] == \
        pytest.approx([0.025, 0.05, 0.075, 0.1])
    with pytest.raises(ValueError, match="unknown lr schedule"):
        engine.learning_rate(0, 10, 0.1, "linear")


def test_label_smoothing_and_mixup_change_the_training_loss(folder, tmp_path):
    losses = {}
    for name, extra in (("plain", ["--label-smoothing", "0"]), ("smooth", ["--label-smoothing", "0.5"]),
                        ("mixup", ["--label-smoothing", "0", "--mixup", "1.0"])):
        assert main(static_args(folder, tmp_path / name, "--train-subset", "8", *extra)) == 0
        losses[name] = read_json(tmp_path / name / "summary.json")["train_loss"]
    assert losses["smooth"] != pytest.approx(losses["plain"], rel=1e-3)
    assert losses["mixup"] != pytest.approx(losses["plain"], rel=1e-3)


def test_mixup_mixes_images_and_targets():
    images, targets = torch.randn(6, 1, 4, 4), torch.arange(6)
    torch.manual_seed(5)
    mixed, a, b, lam = engine.mixup(images, targets, 0.4)
    torch.manual_seed(5)
    expected_lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    perm = torch.randperm(6)
    assert lam == pytest.approx(expected_lam) and torch.equal(a, targets) and torch.equal(b, targets[perm])
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images[perm])


def test_no_weight_decay_on_norms_biases_and_phi():
    from dyconv.models import build_model
    model = build_model("resnet10", conv="dyconv", pad=True, num_classes=3)
    decay, no_decay = engine.parameter_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert any(n.endswith(".phi") for n in no_decay_names) and any(n.endswith("bn1.bias") for n in no_decay_names)
    assert all(p.ndim <= 1 for p in no_decay["params"])
    decayed = {names[id(p)] for p in decay["params"]}
    assert any(n.endswith("bank.kernels") for n in decayed) and any(n.endswith("bank.static_weight") for n in decayed)
    assert len(decayed) + len(no_decay_names) == len(names)


def test_amp_autocasts_to_bfloat16_on_cpu(folder, tmp_path):
    conv = torch.nn.Conv2d(3, 4, 3)
    with engine.autocast(torch.device("cpu"), True):
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.bfloat16
    with engine.autocast(torch.device("cpu"), False):
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.float32
    assert main(static_args(folder, tmp_path, "--train-subset", "8", "--amp")) == 0
    assert math.isfinite(read_json(tmp_path / "summary.json")["train_loss"])


def test_fashion_mnist_from_idx_folder(tmp_path):
    from test_dyconv_data import tiny_fashion_dir
    from dyconv.models import build_model, count_flops
    idx = tiny_fashion_dir(tmp_path / "idx", n_train=8, n_test=4)
    out = tmp_path / "out"
    assert main(["--data", str(idx), "--dataset", "fashion-mnist", "--arch", "resnet10", "--conv", "static",
                 "--epochs", "1", "--batch-size", "4", "--workers", "0", "--image-size", "16", "--output", str(out)]) == 0
    summary = read_json(out / "summary.json")
    meta = engine.load_checkpoint(out / "checkpoint.pt")["meta"]
    assert (summary["dataset"], summary["num_classes"], summary["image_size"]) == ("fashion-mnist", 10, 16)
    assert (meta["in_channels"], meta["small_input"]) == (1, True)
    model = build_model("resnet10", num_classes=10, small_input=True, in_channels=1)
    assert summary["flops"] == count_flops(model, (1, 16, 16))


# ---------------------------------------------------------------- configs

def test_yaml_config_and_command_line_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"arch": "resnet10", "conv": "condconv", "pad": True, "label_smoothing": 0.2,
                                      "lr": 0.05, "dynamic-ratio": 0.4, "epochs": 3}))
    args = parse_args(["--config", str(config)])
    assert (args.arch, args.conv, args.pad, args.label_smoothing, args.lr, args.dynamic_ratio, args.epochs) == \
        ("resnet10", "condconv", True, 0.2, 0.05, 0.4, 3)
    args = parse_args(["--config", str(config), "--lr", "0.01", "--no-pad", "--conv", "static"])
    assert (args.lr, args.pad, args.conv, args.label_smoothing) == (0.01, False, "static", 0.2)
    assert (args.dataset, args.image_size) == ("fashion-mnist", 28)
    assert (parse_args(["--data", "x"]).dataset, parse_args(["--data", "x"]).image_size) == ("imagenet", 224)


def test_resnet_width_builds_narrow_stages_and_must_match_on_resume(folder, tmp_path, capsys):
    """--resnet-width 8: stem and stages 8/16/32/64 channels, recorded in summary and checkpoint; a resume
    with another width is refused by name, and so is a checkpoint without the field (it predates it)."""
    out = tmp_path / "narrow"
    assert main(static_args(folder, out, "--resnet-width", "8")) == 0
    summary = read_json(out / "summary.json")
    assert summary["resnet_width"] == 8
    assert summary["machine"] == machine_description()  # where it ran, for the tables
    assert summary["commit"] == code_version()
    state = engine.load_checkpoint(out / "checkpoint.pt")
    assert state["meta"]["resnet_width"] == 8
    assert [state["model"][f"layer{i}.0.conv1.weight"].shape[0] for i in (1, 2, 3, 4)] == [8, 16, 32, 64]
    assert state["model"]["conv1.weight"].shape[0] == 8
    err = run_failing(static_args(folder, out, "--resnet-width", "16", "--epochs", "2",
                                  "--resume", str(out / "checkpoint.pt")), capsys)
    assert "resnet_width=8, but this run builds resnet_width=16" in err
    wide = tmp_path / "wide"
    assert main(static_args(folder, wide)) == 0
    state = engine.load_checkpoint(wide / "checkpoint.pt")
    del state["meta"]["resnet_width"]
    engine.save_checkpoint(state, wide / "checkpoint.pt")
    err = run_failing(static_args(folder, wide, "--epochs", "2", "--resume", str(wide / "checkpoint.pt")), capsys)
    assert err == (f"error: checkpoint {wide / 'checkpoint.pt'} predates the model field 'resnet_width' (it does not "
                   f"record it); retrain it with this version of dyconv/main.py")


def test_odconv_static_attention_is_recorded_kept_on_resume_and_evaluated_from_the_compact_file(folder, tmp_path,
                                                                                                   capsys):
    """PAD-ODConv's static attention is the authors' channel-filter by default: recorded in summary and checkpoint,
    refused by name on a resume that builds another one, and so is a checkpoint without the field (it predates it);
    none is an explicit choice."""
    odconv = ("--conv", "odconv", "--pad", "--dynamic-ratio", "0.3", "--partition-iterations", "1",
              "--partition-batches", "1", "--resnet-width", "8")
    out = tmp_path / "cf"
    assert main(base_args(folder, out, *odconv)) == 0
    summary = read_json(out / "summary.json")
    assert summary["odconv_static_attention"] == "channel-filter"
    assert engine.load_checkpoint(out / "checkpoint.pt")["meta"]["odconv_static_attention"] == "channel-filter"
    err = run_failing(base_args(folder, out, *odconv, "--epochs", "2", "--odconv-static-attention", "none",
                                "--resume", str(out / "checkpoint.pt")), capsys)
    assert "odconv_static_attention='channel-filter', but this run builds odconv_static_attention='none'" in err
    assert main(base_args(folder, tmp_path / "eval", *odconv, "--odconv-static-attention", "channel-filter",
                          "--evaluate", "--resume", str(out / "model_compact.safetensors"))) == 0
    assert read_json(tmp_path / "eval" / "summary.json")["top1"] == pytest.approx(summary["top1"])
    plain = tmp_path / "none"
    assert main(base_args(folder, plain, *odconv, "--odconv-static-attention", "none")) == 0
    assert read_json(plain / "summary.json")["odconv_static_attention"] == "none"
    assert parse_args(["--conv", "odconv"]).odconv_static_attention == "none"  # not PAD: nothing to scale
    state = engine.load_checkpoint(plain / "checkpoint.pt")
    del state["meta"]["odconv_static_attention"]
    engine.save_checkpoint(state, plain / "checkpoint.pt")
    err = run_failing(base_args(folder, plain, *odconv, "--odconv-static-attention", "none", "--epochs", "2",
                                "--resume", str(plain / "checkpoint.pt")), capsys)
    assert "predates the model field 'odconv_static_attention'" in err


def test_shipped_configs_parse():
    configs = sorted((REPO / "configs" / "dyconv").glob("*.yaml"))
    assert configs
    for config in configs:
        args = parse_args(["--config", str(config)])
        assert args.arch and args.conv


# ---------------------------------------------------------------- bad input

def run_failing(argv, capsys) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--arch", "resnet999"], "argument --arch: invalid choice: 'resnet999'"),
    (["--conv", "fancyconv"], "argument --conv: invalid choice: 'fancyconv'"),
    (["--dynamic-ratio", "0"], "dynamic ratio must be in (0, 1], got 0.0"),
    (["--dynamic-ratio", "1.5"], "dynamic ratio must be in (0, 1], got 1.5"),
    (["--kernels", "0"], "argument --kernels: must be >= 1, got 0"),
    (["--conv", "static", "--pad"], "--pad needs a dynamic --conv"),
    (["--conv", "dyconv", "--pad", "--odconv-static-attention", "channel-filter"],
     "--odconv-static-attention needs --conv odconv --pad"),
    (["--conv", "odconv", "--odconv-static-attention", "channel-filter"],
     "--odconv-static-attention needs --conv odconv --pad"),
    (["--evaluate"], "--evaluate needs --resume"),
    (["--resnet-width", "0"], "argument --resnet-width: must be >= 1, got 0"),
    (["--arch", "mobilenetv2_050", "--resnet-width", "16"], "--resnet-width applies to the ResNets only"),
])
def test_bad_flags(extra, message, folder, tmp_path, capsys):
    err = run_failing(base_args(folder, tmp_path, *extra), capsys)
    assert message in err
    assert not (tmp_path / "summary.json").exists()


def test_bad_data_folders(folder, tmp_path, capsys):
    assert "does not exist" in run_failing(static_args(tmp_path / "missing", tmp_path / "o1"), capsys)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    assert "is empty" in run_failing(static_args(tmp_path / "empty", tmp_path / "o2"), capsys)


def test_unreadable_image_in_a_worker(folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "train" / "c1" / "bad.png").write_bytes(b"not an image at all")
    args = static_args(broken, tmp_path / "out")
    args[args.index("--workers") + 1] = "1"
    err = run_failing(args, capsys)
    assert "cannot read image" in err and str(broken / "train" / "c1" / "bad.png") in err


def test_unknown_config_key(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("arch: resnet10\nlearning_rate: 0.1\n")
    assert "unknown key 'learning_rate'" in run_failing(["--config", str(config)], capsys)


def test_bad_resume_files_never_touch_a_good_checkpoint(pad_run, folder, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(pad_run, out)
    good = out / "checkpoint.pt"
    before = {p.name: sha(p) for p in out.iterdir() if p.is_file()}
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = [
        (pad_args(folder, out, "--resume", str(tmp_path / "nope.pt"), "--overwrite-output-dir"), "does not exist"),
        (pad_args(folder, out, "--resume", str(tmp_path), "--overwrite-output-dir"), "is a directory"),
        (pad_args(folder, out, "--resume", str(truncated), "--overwrite-output-dir"),
         "truncated, damaged or not a dyconv checkpoint"),
        (pad_args(folder, out, "--resume", str(good), "--arch", "resnet18"), "arch='resnet10'"),
        (pad_args(folder, out, "--resume", str(good), "--conv", "condconv"), "conv='dyconv'"),
        (pad_args(folder, out, "--resume", str(good), "--no-pad"), "pad=True"),
        (pad_args(folder, out, "--resume", str(good), "--epochs", "3", "--kernels", "2"), "kernels=4"),
    ]
    for argv, message in cases:
        assert message in run_failing(argv, capsys)
    assert {p.name: sha(p) for p in out.iterdir() if p.is_file()} == before
