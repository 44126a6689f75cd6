"""Nothing lost, nothing cryptic (dyconv/main.py): diverging runs, reused or bad output folders, damaged
checkpoints and configs (generated here: random bytes, truncations, overwritten bytes), the checksum,
exact resume after a real kill, hidden image-folder entries, and DDP (masks not broadcast, empty val shard)."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from dyconv import engine
from dyconv.engine import CheckpointError, TrainingDiverged
from dyconv.main import check_finite, main, parse_args
from pad.runtime import IntegrityError, UsageError
from conftest import fail_writes_to, folder_locked_by_another_process
from test_dyconv_main import run_failing

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
BATCH = 4


def make_folder(root: Path, train_per_class: int = 8, val_per_class: int = 4) -> Path:
    """DIR/{train,val}/c{0,1,2}/*.png of random 32x32 images."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("imagenet"))


def static_args(folder, output, *extra) -> list[str]:
    return ["--data", str(folder), "--arch", "resnet10", "--image-size", "32", "--epochs", "1", "--conv", "static",
            "--batch-size", str(BATCH), "--workers", "0", "--output", str(output), *extra]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hashes(folder: Path) -> dict:
    """Every file's SHA-256, but the folder lock's (it names the process that holds it)."""
    return {p.name: sha(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def static_run(folder, tmp_path_factory) -> Path:
    """One finished static ResNet-10 epoch."""
    out = tmp_path_factory.mktemp("static_run")
    assert main(static_args(folder, out)) == 0
    return out


def same(a, b) -> bool:
    """Deep bit-for-bit equality of nested dicts/lists/tuples of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN == NaN here


# ---------------------------------------------------------------- numeric flags

FLOAT_FLAGS = ["--lr", "--momentum", "--weight-decay", "--warmup-epochs", "--label-smoothing", "--mixup",
               "--temp-init", "--temp-epochs", "--dynamic-ratio"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "infinity"])
@pytest.mark.parametrize("flag", FLOAT_FLAGS)
def test_float_flags_reject_nan_and_infinity(flag, value, tmp_path, capsys):
    err = run_failing(static_args(tmp_path / "data", tmp_path / "out", f"{flag}={value}"), capsys)
    assert f"argument {flag}: must be a finite number, got {value!r}" in err
    assert not (tmp_path / "out").exists()


def test_yaml_nan_is_rejected_like_the_flag(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("lr: .nan\n")
    assert "argument --lr: must be a finite number, got 'nan'" in run_failing(["--config", str(config)], capsys)


# ---------------------------------------------------------------- divergence

def test_fresh_run_with_huge_lr_stops_before_saving(folder, tmp_path, capsys):
    err = run_failing(static_args(folder, tmp_path, "--lr", "1e6", "--epochs", "2"), capsys)
    assert err.startswith("error: training diverged in epoch 1 (iteration ")
    assert "no checkpoint was written before it" in err
    assert not any((tmp_path / name).exists() for name in ("checkpoint.pt", "best.pt", "summary.json"))


def test_diverging_resume_leaves_every_file_byte_identical(static_run, folder, tmp_path, monkeypatch, capsys):
    """The resumed epoch's weights blow up (a huge learning rate from the schedule; a resume may not change --lr)."""
    out = tmp_path / "run"
    shutil.copytree(static_run, out)
    before = hashes(out)
    monkeypatch.setattr(engine.TrainSettings, "lr", lambda self, step: 1e6)
    err = run_failing(static_args(folder, out, "--epochs", "3", "--resume", str(out / "checkpoint.pt")), capsys)
    assert err.startswith("error: training diverged in epoch 2 (iteration ")
    assert f"the last good checkpoint is {out / 'checkpoint.pt'} (epoch 1), left as it was" in err
    assert hashes(out) == before and {"checkpoint.pt", "best.pt", "summary.json"} <= set(before)


def test_check_finite_names_the_bad_statistic_or_loss():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    good = {"loss": 1.0}
    check_finite(model, good, 3, 7)
    with pytest.raises(TrainingDiverged, match=r"epoch 3 \(iteration 7\): the validation loss is nan"):
        check_finite(model, {"loss": float("nan")}, 3, 7)
    model[1].running_var[1] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"1 weights or BatchNorm statistics are not finite \(first: 1.running_var\)"):
        check_finite(model, good, 3, 7)
    model[1].running_var.fill_(1.0)
    model[0].weight.data[0] = float("nan")
    assert engine.nonfinite_tensors(model) == ["0.weight"]


# ---------------------------------------------------------------- the output folder

def test_bad_output_is_reported_before_any_data_is_read(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    missing_data = tmp_path / "no-such-data"  # reading it would fail: the output error must come first
    cases = [(tmp_path / "file", "is a file, not a folder"),
             (tmp_path / "file" / "sub", f"is under {tmp_path / 'file'}, which is a file"),
             (Path("/proc/dyconv-output"), "is not a writable folder")]
    for output, message in cases:
        err = run_failing(static_args(missing_data, output), capsys)
        assert err.startswith(f"error: --output {output} ") and message in err


def test_fresh_run_refuses_a_folder_holding_a_run(static_run, folder, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(static_run, out)
    before = hashes(out)
    err = run_failing(static_args(folder, out), capsys)
    assert f"--output {out} already holds a run (checkpoint.pt, best.pt, summary.json)" in err
    assert "--overwrite-output-dir" in err
    for name in ("checkpoint.pt", "best.pt"):  # each file alone marks a run
        (tmp_path / name).mkdir()
        (tmp_path / name / name).write_bytes(b"x")
        assert "already holds a run" in run_failing(static_args(folder, tmp_path / name), capsys)
    assert hashes(out) == before


def test_overwrite_output_dir_flag_and_yaml_key(static_run, folder, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(static_run, out)
    old = engine.load_checkpoint(out / "checkpoint.pt")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"overwrite_output_dir": True, "seed": 1}))
    assert parse_args(["--config", str(config)]).overwrite_output_dir is True
    assert parse_args(["--config", str(config), "--no-overwrite-output-dir"]).overwrite_output_dir is False
    old_events = {p.name for p in (out / "tb").iterdir()}
    capsys.readouterr()
    assert main(["--config", str(config), *static_args(folder, out)]) == 0
    assert "--overwrite-output-dir: removed summary.json, tb of the replaced run" in capsys.readouterr().out
    new = engine.load_checkpoint(out / "checkpoint.pt")
    assert new["args"]["seed"] == 1 and not same(old["model"], new["model"])
    assert json.loads((out / "summary.json").read_text())["seed"] == 1
    assert not old_events & {p.name for p in (out / "tb").iterdir()}  # the replaced run's events are gone


def test_evaluate_never_overwrites_a_training_folder(static_run, folder, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(static_run, out)
    before = hashes(out)
    for extra in ([], ["--overwrite-output-dir"]):
        err = run_failing(static_args(folder, out, "--evaluate", "--resume", str(out / "best.pt"), *extra), capsys)
        assert "holds a training run (checkpoint.pt, best.pt, summary.json); --evaluate never overwrites it" in err
    assert hashes(out) == before
    evaluation = tmp_path / "eval"
    assert main(static_args(folder, evaluation, "--evaluate", "--resume", str(out / "best.pt"))) == 0
    assert json.loads((evaluation / "summary.json").read_text())["evaluate_only"] is True
    assert "already holds a run (summary.json)" in run_failing(
        static_args(folder, evaluation, "--evaluate", "--resume", str(out / "best.pt")), capsys)


def test_stale_temporaries_are_removed_when_a_run_continues(static_run, folder, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(static_run, out)
    (out / "checkpoint.pt.tmp").write_bytes(os.urandom(1000))  # what kill -9 during a write leaves
    (out / "best.pt.tmp").write_bytes(b"")
    capsys.readouterr()
    assert main(static_args(folder, out, "--epochs", "2", "--resume", str(out / "checkpoint.pt"))) == 0
    assert "removed 2 stale temporary file(s) of an interrupted run: checkpoint.pt.tmp, best.pt.tmp" in \
        capsys.readouterr().out
    assert not list(out.glob("*.tmp")) and engine.load_checkpoint(out / "checkpoint.pt")["epoch"] == 2


# ---------------------------------------------------------------- checkpoints: checksum and fuzz

def tiny_state() -> dict:
    """A small checkpoint-shaped state (a conv + BN model, an SGD state, random states)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 2, 5, 5)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "meta": {"arch": "tiny"},
            "epoch": 1, "step": 3, "metrics": {"top1": 50.0}, "rng": [engine.random_states(torch.device("cpu"))]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    state = tiny_state()
    engine.save_checkpoint(state, path)
    return path, state


def load_outcome(path: Path, original: dict) -> str:
    """'error' (CheckpointError) or 'intact' (the original state exactly); anything else fails the test,
    and so does any warning (on the command line it would be a second line)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            state = engine.load_checkpoint(path)
    except (CheckpointError, IntegrityError) as err:
        message = str(err)
        assert "\n" not in message and "weights_only" not in message, message
        return "error"
    assert same(state, original), "a damaged checkpoint loaded as something else"
    return "intact"


def test_checkpoint_round_trip_and_checksum_record(saved):
    path, state = saved
    assert same(engine.load_checkpoint(path), state)
    wrapper = torch.load(path, weights_only=True)
    assert wrapper["format"] == engine.CHECKPOINT_FORMAT
    assert wrapper["sha256"] == hashlib.sha256(wrapper["payload"].numpy().tobytes()).hexdigest()
    assert not path.with_name("checkpoint.pt.tmp").exists()


def test_checkpoint_is_flushed_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(engine.os, "fsync", lambda fd: (events.append(("fsync", fd)), real_fsync(fd)))
    monkeypatch.setattr(engine.os, "replace", lambda a, b: (events.append(("replace", Path(a).name, Path(b).name)),
                                                            real_replace(a, b)))
    engine.save_checkpoint(tiny_state(), tmp_path / "checkpoint.pt")
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"]  # the file, the rename, then the folder holding the rename
    assert events[1][1:] == ("checkpoint.pt.tmp", "checkpoint.pt") and not list(tmp_path.glob("*.tmp"))


def test_random_bytes_of_many_lengths_are_rejected(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "garbage.pt"
    prefixes = [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."]
    lengths = [0, 1, 2, 3, 7, 8, 16, 31, 64, 100, 255, 512, 1000, 4096, 10000]
    for prefix in prefixes:
        for length in lengths:
            for _ in range(6):
                path.write_bytes(prefix + rng.integers(0, 256, length, dtype=np.uint8).tobytes())
                assert load_outcome(path, {}) == "error"


def test_truncation_at_many_offsets_is_rejected(saved, tmp_path):
    path, state = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    offsets = sorted(set(np.linspace(0, len(data) - 1, 300).astype(int).tolist()) | set(range(len(data) - 40, len(data))))
    for offset in offsets:
        cut.write_bytes(data[:offset])
        assert load_outcome(cut, state) == "error", offset


def test_overwritten_bytes_are_reported_or_harmless(saved, tmp_path):
    """Same size, bytes changed anywhere: an error, or (padding, unused zip fields) the original state exactly."""
    path, state = saved
    data = bytearray(path.read_bytes())
    payload = torch.load(path, weights_only=True)["payload"].numpy().tobytes()
    start = bytes(data).find(payload)  # where the serialized state lies inside the file (stored uncompressed)
    assert start > 0
    damaged = tmp_path / "damaged.pt"
    outcomes = {}
    for offset in range(0, len(data) - 4, max(1, len(data) // 400)):
        copy = bytearray(data)
        copy[offset:offset + 4] = bytes(b ^ 0xFF for b in copy[offset:offset + 4])
        damaged.write_bytes(copy)
        outcomes[offset] = load_outcome(damaged, state)
    inside = [o for o in outcomes if start <= o < start + len(payload) - 4]
    assert inside and all(outcomes[o] == "error" for o in inside)  # every byte of the state is covered
    copy = bytearray(data)
    copy[start + len(payload) // 2] ^= 0x01  # one flipped bit inside the serialized state
    damaged.write_bytes(copy)
    with pytest.raises(IntegrityError, match=re.escape(f"{damaged}: checksum does not match its contents (damaged file)")):
        engine.load_checkpoint(damaged)


def test_foreign_and_malformed_structures(tmp_path):
    path = tmp_path / "x.pt"
    good = tiny_state()
    cases = [
        ({"a": 1}, "not a dyconv checkpoint (expected keys"),
        (torch.zeros(3), "not a dyconv checkpoint (expected keys"),
        ([1, 2, 3], "not a dyconv checkpoint (expected keys"),
        ({**good, "meta": [1, 2]}, "'meta' is not a mapping"),
        ({**good, "meta": "resnet10"}, "'meta' is not a mapping"),
        ({**good, "model": [torch.zeros(1)]}, "'model' is not a state dict"),
        ({**good, "epoch": "1"}, "'epoch' is not a count"),
        ({**good, "step": -1}, "'step' is not a count"),
        ({**good, "rng": "x"}, "'rng' is malformed"),
        ({**good, "rng": {"torch": 1}}, "'rng' is malformed"),
        ({**good, "metrics": [1.0]}, "'metrics' is malformed"),
        ({**good, "temperature": "hot"}, "'temperature' is malformed"),
        ({**good, "model": {**good["model"], "1.running_var": torch.full((3,), float("inf"))}},
         "holds non-finite values in 1 tensors (first: 1.running_var)"),
    ]
    for state, message in cases:
        engine.save_checkpoint(state, path)
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            engine.load_checkpoint(path)
    wrapper = torch.load(path, weights_only=True)
    torch.save({**wrapper, "sha256": 5}, path)
    with pytest.raises(IntegrityError, match="its checksum record is malformed"):
        engine.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        engine.load_checkpoint(tmp_path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        engine.load_checkpoint(path)


def test_checkpoint_without_checksum_is_refused(tmp_path):
    """A bare state (a checkpoint that predates checksums) is refused: nothing tells it from a damaged one."""
    path = tmp_path / "old.pt"
    state = tiny_state()
    del state["rng"]
    torch.save(state, path)
    with pytest.raises(IntegrityError) as err:
        engine.load_checkpoint(path)
    assert str(err.value) == (f"checkpoint {path} predates checksummed checkpoints (it records no SHA-256); "
                              f"retrain it with this version of dyconv/main.py")


def test_cli_reports_garbage_resume_and_config_files_in_one_line(static_run, folder, tmp_path, capsys):
    """The whole CLI path once in a subprocess (garbage --resume), then in-process: garbage --config, a directory."""
    out = tmp_path / "run"
    shutil.copytree(static_run, out)
    before = hashes(out)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"PK\x03\x04" + os.urandom(3000))
    result = subprocess.run([sys.executable, "dyconv/main.py", *static_args(folder, out, "--overwrite-output-dir"),
                             "--resume", str(garbage)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    err = result.stderr.strip()
    assert result.returncode == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert f"checkpoint {garbage} is truncated, damaged or not a dyconv checkpoint" in err
    assert f"cannot read config {tmp_path}: Is a directory" in run_failing(["--config", str(tmp_path)], capsys)
    assert f"config {garbage} is not UTF-8 text" in run_failing(["--config", str(garbage)], capsys)
    assert f"checkpoint {tmp_path} is a directory" in run_failing(
        static_args(folder, out, "--overwrite-output-dir", "--resume", str(tmp_path)), capsys)
    assert hashes(out) == before


def test_checkpoint_whose_contents_do_not_fit_the_model(static_run, folder, tmp_path, capsys):
    """Right metadata, wrong contents (checksum intact): one error line, the run folder untouched."""
    state = engine.load_checkpoint(static_run / "checkpoint.pt")
    weights = dict(state["model"])
    weights.pop("fc.weight")
    cases = [({**state, "model": weights}, "does not fit the model: Error(s) in loading state_dict"),
             ({**state, "optimizer": {"state": {}, "param_groups": []}}, "holds an optimizer state that does not fit")]
    for bad, message in cases:
        engine.save_checkpoint(bad, tmp_path / "bad.pt")
        err = run_failing(static_args(folder, tmp_path / "out", "--epochs", "2", "--resume", str(tmp_path / "bad.pt")),
                          capsys)
        assert message in err
        assert not (tmp_path / "out" / "checkpoint.pt").exists()


# ---------------------------------------------------------------- configs: fuzz

def test_config_files_of_any_content_parse_or_fail_in_one_line(tmp_path):
    shipped = (REPO / "configs" / "dyconv" / "fashion_mnist_quick.yaml").read_bytes()
    rng = np.random.default_rng(2)
    contents = [shipped[:n] for n in range(0, len(shipped) + 1, max(1, len(shipped) // 60))]
    contents += [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1, 2, 5, 20, 100, 1000) for _ in range(8)]
    contents += [rng.integers(32, 127, n, dtype=np.uint8).tobytes() for n in (5, 20, 100) for _ in range(8)]
    contents += [b"a: 2024-13-45\n", b"lr: !!binary aGVsbG8=\n", b"lr: !!set {1}\n", b"[" * 5000, b"\x00\x01"]
    config = tmp_path / "c.yaml"
    outcomes = {"parsed": 0, "rejected": 0}
    for content in contents:
        config.write_bytes(content)
        try:
            parse_args(["--config", str(config)])
            outcomes["parsed"] += 1
        except UsageError as err:
            assert "\n" not in str(err) and str(err), content
            outcomes["rejected"] += 1
    assert outcomes["parsed"] > 0 and outcomes["rejected"] > 0
    with pytest.raises(UsageError, match="Is a directory"):
        parse_args(["--config", str(tmp_path)])


# ---------------------------------------------------------------- exact resume after a real kill

def resume_args(folder, output, workers: int) -> list[str]:
    return ["--data", str(folder), "--arch", "resnet10", "--image-size", "32", "--epochs", "2", "--train-subset", "12",
            "--val-subset", "6", "--batch-size", str(BATCH), "--workers", str(workers), "--output", str(output), "--conv", "dyconv",
            "--pad", "--dynamic-ratio", "0.5", "--partition-iterations", "1", "--partition-batches", "1",
            "--mixup", "0.4", "--temp-epochs", "2", "--seed", "3"]


def comparable(output: Path) -> tuple[dict, dict, dict]:
    """checkpoint.pt and best.pt without the command line (paths differ), summary.json without wall times."""
    states = []
    for name in ("checkpoint.pt", "best.pt"):
        state = engine.load_checkpoint(output / name)
        state.pop("args")
        states.append(state)
    summary = json.loads((output / "summary.json").read_text())
    summary.pop("wall_seconds"), summary.pop("train_seconds_per_step")
    return states[0], states[1], summary


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_and_resumed_run_ends_bit_for_bit_where_the_uninterrupted_run_ends(folder, tmp_path, workers):
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "dyconv/main.py", *resume_args(folder, killed, workers)], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the run and its loader workers, right after the first checkpoint
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert engine.load_checkpoint(killed / "checkpoint.pt")["epoch"] == 1, "the run finished before it was killed"
    assert main(resume_args(folder, killed, workers) + ["--resume", str(killed / "checkpoint.pt")]) == 0

    uninterrupted = tmp_path / "uninterrupted"
    assert main(resume_args(folder, uninterrupted, workers)) == 0
    for resumed, reference in zip(comparable(killed), comparable(uninterrupted)):
        assert same(resumed, reference)
    assert engine.load_checkpoint(uninterrupted / "checkpoint.pt")["epoch"] == 2


def test_resume_restores_every_random_state():
    import random
    device = torch.device("cpu")
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    states = engine.random_states(device)
    expected = (torch.rand(3), random.random(), np.random.rand(), np.random.randn())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    engine.restore_random_states(states, device)
    assert same((torch.rand(3), random.random(), np.random.rand(), np.random.randn()), expected)
    with pytest.raises(CheckpointError, match="random states are malformed"):
        engine.restore_random_states({"torch": "x"}, device)


# ---------------------------------------------------------------- hidden entries in image folders

def test_hidden_entries_are_skipped_and_counted_in_the_log(folder, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    (data / "train" / ".ipynb_checkpoints").mkdir()
    (data / "train" / "c0" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (data / "val" / "c1" / ".hidden").mkdir()
    (data / "val" / "c1" / ".hidden" / "x.png").write_bytes(b"not an image")
    capsys.readouterr()
    assert main(static_args(data, tmp_path / "out")) == 0
    assert "data: skipped 3 hidden entries (names starting with '.'" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["train_samples"], summary["val_samples"], summary["num_classes"]) == (24, 12, 3)


# ---------------------------------------------------------------- DDP

def test_ddp_ignores_masks_but_syncs_batchnorm_buffers(tmp_path):
    import torch.distributed as dist
    from dyconv.main import Distributed, wrap_ddp
    from dyconv.models import build_model
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_model("resnet10", conv="dyconv", pad=True, num_classes=3)
        net = wrap_ddp(model, Distributed(rank=0, world_size=2))
        masks = {n for n, _ in model.named_buffers() if n.endswith(".mask")}
        synced = set(net.named_module_buffers)
        assert masks and not masks & synced and masks <= net.parameters_to_ignore
        assert {n for n, _ in model.named_buffers() if n.endswith(("running_mean", "running_var"))} <= synced
        assert {n for n, _ in model.named_parameters()} == {n for n, _ in net.module.named_parameters()}
    finally:
        dist.destroy_process_group()


def test_torchrun_rank_without_validation_samples_does_not_hang(folder, tmp_path):
    """2 gloo processes, one validation image: rank 1's shard is empty; the run must finish."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dyconv/main.py",
           "--data", str(folder), "--arch", "resnet10", "--image-size", "32", "--epochs", "2", "--batch-size", "4",
           "--workers", "0", "--output", str(tmp_path), "--conv", "dyconv", "--pad", "--partition-iterations", "1",
           "--partition-batches", "1", "--val-subset", "1"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["val_samples"] == 1
    state = engine.load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["metrics"]["samples"] == 1 and len(state["rng"]) == 2  # one random-state record per rank


# ---------------------------------------------------------------- preemption, recovery checkpoints, locks

import dyconv.main as dyconv_main  # noqa: E402


def stop_at_call(monkeypatch, call: int, signum=signal.SIGUSR1) -> None:
    """Sends this process a real ``signum`` just before the ``call``-th stop check (1: before the first step,
    k + 1: after the k-th step of the first epoch, then the epoch's end, ...)."""
    calls = {"n": 0}
    original = dyconv_main.stop_requested

    def checking(signals, ctx):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signum)
        return original(signals, ctx)
    monkeypatch.setattr(dyconv_main, "stop_requested", checking)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("call", [1, 3, 5, 6])  # before training, inside epoch 1, at its end, first step of epoch 2
def test_a_stop_signal_saves_and_the_resumed_run_ends_bit_for_bit(folder, tmp_path, monkeypatch, capsys, workers, call):
    """Train 2 epochs of 3 steps; a signal at several points of an epoch saves at the current step and exits
    128 + signal with one line naming the checkpoint; --resume auto then ends where the uninterrupted run ends."""
    stopped = tmp_path / "stopped"
    stop_at_call(monkeypatch, call)
    assert main(resume_args(folder, stopped, workers)) == 128 + signal.SIGUSR1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGUSR1: saved "), lines
    saved = lines[0].split("saved ")[1].split(" at ")[0]
    assert Path(saved).name == ("checkpoint.pt" if call == 5 else "recovery.pt")
    monkeypatch.undo()
    assert main(resume_args(folder, stopped, workers) + ["--resume", "auto"]) == 0
    assert not (stopped / "recovery.pt").exists()  # superseded by the epoch checkpoint
    uninterrupted = tmp_path / "uninterrupted"
    assert main(resume_args(folder, uninterrupted, workers)) == 0
    for resumed, reference in zip(comparable(stopped), comparable(uninterrupted)):
        assert same(resumed, reference)


def test_save_steps_writes_recovery_checkpoints_and_never_replaces_the_epoch_checkpoint(folder, tmp_path, monkeypatch):
    written = []
    original = dyconv_main.save_checkpoint
    monkeypatch.setattr(dyconv_main, "save_checkpoint", lambda state, path: (
        written.append((Path(path).name, state["epoch"], state["step"], state.get("epoch_progress"))),
        original(state, path)))
    assert main(resume_args(folder, tmp_path / "run", 0) + ["--save-steps", "2"]) == 0
    assert [w[:3] for w in written] == [("recovery.pt", 0, 2), ("best.pt", 1, 3), ("recovery.pt", 1, 4),
                                        ("recovery.pt", 1, 6), ("best.pt", 2, 6)] or \
        [w[:3] for w in written] == [("recovery.pt", 0, 2), ("best.pt", 1, 3), ("recovery.pt", 1, 4),
                                     ("recovery.pt", 1, 6), ("checkpoint.pt", 2, 6)]
    assert written[0][3] == {"batches": 2, "loss_sum": pytest.approx(written[0][3]["loss_sum"])}
    assert not (tmp_path / "run" / "recovery.pt").exists()


def test_resume_auto_starts_fresh_in_an_empty_folder(static_run, folder, tmp_path, capsys):
    assert main(static_args(folder, tmp_path / "fresh", "--resume", "auto")) == 0
    assert engine.load_checkpoint(tmp_path / "fresh" / "checkpoint.pt")["epoch"] == 1
    shutil.copytree(static_run, tmp_path / "done")
    assert main(static_args(folder, tmp_path / "done", "--resume", "auto", "--epochs", "2")) == 0
    assert "--resume auto: continuing from" in capsys.readouterr().out
    assert engine.load_checkpoint(tmp_path / "done" / "checkpoint.pt")["epoch"] == 2


def test_a_second_run_into_a_locked_folder_is_refused(folder, tmp_path, capsys):
    output = tmp_path / "busy"
    output.mkdir()
    with folder_locked_by_another_process(output) as holder:
        message = run_failing(static_args(folder, output), capsys)
        assert f"pid {holder.pid} on host" in message and str(output) in message
        assert sorted(p.name for p in output.iterdir()) == [".lock"]  # nothing written
    assert main(static_args(folder, output)) == 0  # released when its holder died


@pytest.mark.parametrize("flag, value, recorded", [
    ("--batch-size", "2", "4"), ("--image-size", "40", "32"), ("--seed", "5", "0"), ("--temp-init", "10", "30.0"),
    ("--dynamic-ratio", "0.5", "0.3"), ("--lr", "0.5", "0.1"), ("--partition-criterion", "random", "'taylor'"),
])
def test_a_resume_that_changes_the_run_is_refused_by_name(static_run, folder, tmp_path, capsys, flag, value, recorded):
    output = shutil.copytree(static_run, tmp_path / "run")
    before = hashes(output)
    message = run_failing(static_args(folder, output, "--resume", str(output / "checkpoint.pt"), "--epochs", "2",
                                      flag, value), capsys)
    assert message.startswith(f"error: {flag} is ") and f"trained with {recorded}" in message
    assert hashes(output) == before


@pytest.mark.parametrize("targets", [("checkpoint.pt", "best.pt"), ("recovery.pt",), ("summary.json",)])
@pytest.mark.parametrize("errno_", [28, 30, 5])  # ENOSPC, EROFS, EIO
def test_a_failed_write_is_one_error_line_and_keeps_the_last_good_checkpoint(static_run, folder, tmp_path, monkeypatch,
                                                                           capsys, targets, errno_):
    output = shutil.copytree(static_run, tmp_path / "run")
    before = hashes(output)
    fail_writes_to(monkeypatch, targets, errno_)
    message = run_failing(static_args(folder, output, "--resume", str(output / "checkpoint.pt"), "--epochs", "2",
                                      "--save-steps", "1"), capsys)
    assert any(message == f"error: cannot write {output / name}: {os.strerror(errno_)}" for name in targets), message
    assert not list(output.glob("*.tmp"))
    after = hashes(output)
    if targets == ("summary.json",):  # the epoch checkpoint was written before: it is the last good one
        assert engine.load_checkpoint(output / "checkpoint.pt")["epoch"] == 2
        assert after["summary.json"] == before["summary.json"]
    elif targets == ("recovery.pt",):
        assert after == before
    else:  # the recovery checkpoints of the epoch's steps were written; the epoch checkpoints are untouched
        recovery = engine.load_checkpoint(output / "recovery.pt")
        assert recovery["epoch"] == 1 and recovery["epoch_progress"]["batches"] == 6  # 24 images, batch 4
        after.pop("recovery.pt")
        assert after == before


def test_a_failed_compact_export_is_one_error_line(folder, tmp_path, monkeypatch, capsys):
    output = tmp_path / "pad"
    fail_writes_to(monkeypatch, ("model_compact.safetensors",), 28)
    message = run_failing(resume_args(folder, output, 0), capsys)
    assert message == f"error: cannot write {output / 'model_compact.safetensors'}: {os.strerror(28)}"
    assert engine.load_checkpoint(output / "checkpoint.pt")["epoch"] == 2
    assert not list(output.glob("*.tmp")) and not (output / "model_compact.safetensors").exists()


def test_a_tensorboard_write_failure_is_one_error_line(static_run, folder, tmp_path, monkeypatch, capsys):
    output = shutil.copytree(static_run, tmp_path / "run")
    before = hashes(output)

    def read_only(self, *args, **kwargs):
        raise OSError(30, os.strerror(30), str(output / "tb" / "events"))
    monkeypatch.setattr(dyconv_main.SummaryWriter, "add_scalar", read_only)
    message = run_failing(static_args(folder, output, "--resume", str(output / "checkpoint.pt"), "--epochs", "2"),
                          capsys)
    assert message == f"error: cannot write {output / 'tb' / 'events'}: Read-only file system"
    assert hashes(output) == before
