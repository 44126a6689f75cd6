"""moe/run_glue.py across interruptions: a resumed run ends where the uninterrupted one ends
(weights, metrics, partition report), and a non-finite loss stops a run before anything is saved."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe.run_glue as run_glue
from moe.run_glue import main
from conftest import fail_writes_to, folder_locked_by_another_process
from test_run_glue import base_args, metric_values, read_json


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(args, capfd) -> tuple[int, list[str]]:
    capfd.readouterr()
    code = main(args)
    return code, [line for line in capfd.readouterr().err.splitlines() if line.startswith("error")]


def pad_args(model, glue_dir, out, *extra):
    """A PAD run of 4 optimizer steps with a checkpoint every 2 (dropout, gate noise and the
    shuffled sampler all draw random numbers, so resuming must restore them)."""
    args = base_args(model, glue_dir, out, "sst2", "--moe", "pad", "--do_train", "--do_eval", "--max_steps", "4",
                     "--save_steps", "2", *extra)
    args[args.index("--save_strategy") + 1] = "steps"
    return args


@pytest.mark.parametrize("warmup", ["0", "1"])
def test_resumed_pad_run_ends_where_the_uninterrupted_one_ends(warmup, tiny_bert_dir, glue_dir, tmp_path):
    """IMP before training (warm-up 0) or at step 1 (warm-up 1): either way the checkpoint at step 2
    comes after the partition, so the resumed run does not partition and must keep the report."""
    torch.set_num_threads(1)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(pad_args(tiny_bert_dir, glue_dir, whole, "--partition_warmup_steps", warmup)) == 0
    # the interrupted run: all it left is its checkpoint at step 2
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    assert (resumed / "checkpoint-2" / "partition.json").is_file()
    assert main(pad_args(tiny_bert_dir, glue_dir, resumed, "--partition_warmup_steps", warmup,
                         "--resume_from_checkpoint", str(resumed / "checkpoint-2"))) == 0

    assert read_json(resumed / "partition.json") == read_json(whole / "partition.json")
    assert read_json(whole / "partition.json")["step"] == int(warmup)
    final_whole, final_resumed = read_json(whole / "all_results.json"), read_json(resumed / "all_results.json")
    partition_keys = [k for k in final_whole if k.startswith("partition_")]
    assert len(partition_keys) == 10
    assert {k: final_resumed.get(k) for k in partition_keys} == {k: final_whole[k] for k in partition_keys}
    assert metric_values(final_resumed) == metric_values(final_whole)
    weights_whole, weights_resumed = load_file(str(whole / "model.safetensors")), load_file(
        str(resumed / "model.safetensors"))
    assert weights_whole.keys() == weights_resumed.keys()
    for name, tensor in weights_whole.items():
        assert torch.equal(tensor, weights_resumed[name]), name
    # the checkpoint written after the resume carries the report too
    assert read_json(resumed / "checkpoint-4" / "partition.json") == read_json(whole / "partition.json")


def test_resume_from_a_checkpoint_that_predates_its_records_is_refused(tiny_bert_dir, glue_dir, tmp_path, capfd):
    """A PAD checkpoint past its partition step without partition.json, one without run_args.json, and a partition
    report without decided_by predate those records: one error line each, nothing trained or written."""
    torch.set_num_threads(1)
    whole = tmp_path / "whole"
    assert main(pad_args(tiny_bert_dir, glue_dir, whole, "--max_steps", "2", "--do_eval", "false")) == 0
    cases = {"partition.json": "partition reports in checkpoints (it has no partition.json)",
             "run_args.json": "recorded run arguments (it has no run_args.json)"}
    for removed, what in cases.items():
        resumed = tmp_path / f"resumed-{removed}"
        shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
        (resumed / "checkpoint-2" / removed).unlink()
        code, errors = run_cli(pad_args(tiny_bert_dir, glue_dir, resumed, "--do_eval", "false",
                                        "--resume_from_checkpoint", str(resumed / "checkpoint-2")), capfd)
        assert code == 2 and errors == [f"error: checkpoint {resumed / 'checkpoint-2'} predates {what}; train the run "
                                        f"again with this version of moe/run_glue.py"]
        assert not (resumed / "checkpoint-4").exists() and not (resumed / "all_results.json").exists()
    resumed = tmp_path / "resumed-decided_by"
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    report = resumed / "checkpoint-2" / "partition.json"
    report.write_text(json.dumps({k: v for k, v in read_json(report).items() if k != "decided_by"}))
    code, errors = run_cli(pad_args(tiny_bert_dir, glue_dir, resumed, "--do_eval", "false",
                                    "--resume_from_checkpoint", str(resumed / "checkpoint-2")), capfd)
    assert code == 2 and errors == [f"error: partition report {report} predates records of what decided the partition "
                                    f"(it has no decided_by); train the run again with this version of moe/run_glue.py"]


# ---------------------------------------------------------------- non-finite losses

def regression_csv(path: Path, label: float) -> Path:
    rows = "".join(f"{'good great' if i % 2 else 'bad'} movie,{label if i % 2 else 0.0}\n" for i in range(16))
    path.write_text("text,label\n" + rows)
    return path


def test_non_finite_training_loss_keeps_checkpoints_and_model(make_tiny_bert_dir, tmp_path, capfd):
    """A good run (2 steps, a checkpoint each), then the same run continued on data whose squared
    error overflows: it stops at step 3 with one error line; nothing in the folder changes."""
    torch.set_num_threads(1)
    model, out = make_tiny_bert_dir(num_labels=1), tmp_path / "out"

    def args(train_file, steps):
        return ["--model_name_or_path", str(model), "--train_file", str(train_file), "--output_dir", str(out),
                "--do_train", "--max_steps", str(steps), "--save_strategy", "steps", "--save_steps", "1",
                "--per_device_train_batch_size", "4", "--use_cpu", "true", "--report_to", "none",
                "--disable_tqdm", "true", "--max_seq_length", "16", "--cache_dir", str(tmp_path / "cache")]

    assert main(args(regression_csv(tmp_path / "good.csv", 1.0), 2)) == 0
    before = tree_digest(out)
    assert {"checkpoint-1/model.safetensors", "checkpoint-2/optimizer.pt", "model.safetensors",
            "all_results.json"} <= set(before)
    code, errors = run_cli(args(regression_csv(tmp_path / "huge.csv", 1e38), 4), capfd)
    assert code == 2
    assert errors == [f"error: non-finite training loss (inf) at step 3; stopped before saving, "
                      f"last checkpoint: {out / 'checkpoint-2'}"]
    assert tree_digest(out) == before


def test_non_finite_evaluation_loss_writes_no_results(tiny_bert_dir, glue_dir, tmp_path, capfd):
    """Finite but huge classifier weights: the logits overflow and the evaluation loss is infinite."""
    torch.set_num_threads(1)
    model = tmp_path / "huge"
    shutil.copytree(tiny_bert_dir, model)
    state = load_file(str(model / "model.safetensors"))
    state["classifier.weight"] = torch.full_like(state["classifier.weight"], 3e38) * torch.tensor([[1.0], [-1.0]])
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    code, errors = run_cli(base_args(model, glue_dir, out, "sst2", "--do_eval"), capfd)
    assert code == 2 and errors == ["error: non-finite evaluation loss (inf) at step 0; stopped before saving, "
                                    "last checkpoint: none"]
    assert not (out / "eval_results.json").exists() and not (out / "all_results.json").exists()


def test_non_finite_evaluation_during_training_saves_no_checkpoint(make_tiny_bert_dir, tmp_path, capfd):
    """Evaluation and a save every step; gold scores whose squared error overflows make the
    evaluation loss at step 1 infinite (training stays finite): the run stops before step 1's checkpoint."""
    torch.set_num_threads(1)
    out = tmp_path / "out"
    args = ["--model_name_or_path", str(make_tiny_bert_dir(num_labels=1)),
            "--train_file", str(regression_csv(tmp_path / "train.csv", 1.0)),
            "--validation_file", str(regression_csv(tmp_path / "dev.csv", 1e38)), "--output_dir", str(out),
            "--do_train", "--do_eval", "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "1",
            "--save_strategy", "steps", "--save_steps", "1", "--per_device_train_batch_size", "4", "--use_cpu",
            "true", "--report_to", "none", "--disable_tqdm", "true", "--max_seq_length", "16",
            "--cache_dir", str(tmp_path / "cache")]
    code, errors = run_cli(args, capfd)
    assert code == 2
    assert errors == ["error: non-finite evaluation loss (inf) at step 1; stopped before saving, last checkpoint: none"]
    assert not out.exists() or not any(p.name.startswith("checkpoint-") or p.suffix in (".json", ".safetensors")
                                       for p in out.iterdir())


# ---------------------------------------------------------------- stop signals

def signal_during_step(monkeypatch, step: int, signum: int) -> None:
    """Sends this process a real ``signum`` while training step ``step`` (1-based) runs."""
    original = run_glue.MoETrainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step + 1 == step:
            os.kill(os.getpid(), signum)
        return original(self, model, inputs, num_items_in_batch)
    monkeypatch.setattr(run_glue.MoETrainer, "training_step", training_step)


@pytest.mark.parametrize("signum, step", [(signal.SIGTERM, 3), (signal.SIGINT, 1), (signal.SIGUSR1, 4)])
def test_a_stop_signal_saves_and_the_rerun_ends_where_the_uninterrupted_run_ends(tiny_bert_dir, glue_dir, tmp_path,
                                                                                 monkeypatch, capfd, signum, step):
    """A signal during step k: the step ends, checkpoint-k is saved, one line names it, exit 128 + signal, no
    final model or results; the same command then continues from checkpoint-k and ends as an uninterrupted run."""
    torch.set_num_threads(1)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    signal_during_step(monkeypatch, step, signum)
    capfd.readouterr()
    assert main(pad_args(tiny_bert_dir, glue_dir, stopped)) == 128 + signum
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith(("stopped", "error"))]
    name = signal.Signals(signum).name
    assert lines == [f"stopped by {name}: saved {stopped / f'checkpoint-{step}'}; rerun the same command to continue"]
    assert (stopped / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (stopped / "model.safetensors").exists() and not (stopped / "all_results.json").exists()
    monkeypatch.undo()

    assert main(pad_args(tiny_bert_dir, glue_dir, stopped)) == 0
    assert main(pad_args(tiny_bert_dir, glue_dir, whole)) == 0
    assert metric_values(read_json(stopped / "all_results.json")) == metric_values(read_json(whole / "all_results.json"))
    assert read_json(stopped / "partition.json") == read_json(whole / "partition.json")
    weights_whole, weights_stopped = (load_file(str(out / "model.safetensors")) for out in (whole, stopped))
    for name, tensor in weights_whole.items():
        assert torch.equal(tensor, weights_stopped[name]), name


# ---------------------------------------------------------------- checkpoints left incomplete

@pytest.fixture(scope="module")
def whole_pad_run(tiny_bert_dir, glue_dir, tmp_path_factory):
    """The uninterrupted run of :func:`pad_args` (checkpoints at steps 2 and 4)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("whole") / "out"
    assert main(pad_args(tiny_bert_dir, glue_dir, out)) == 0
    return out


@pytest.mark.parametrize("lost", ["model.safetensors", "trainer_state.json", "optimizer.pt"])
def test_an_incomplete_newest_checkpoint_is_skipped_with_a_warning(whole_pad_run, tiny_bert_dir, glue_dir, tmp_path,
                                                                    capfd, lost):
    """checkpoint-4 lost a file to a kill while it was saved: the rerun warns once, naming it, resumes from
    checkpoint-2 (left as it was until the run passes it) and ends as the uninterrupted run."""
    torch.set_num_threads(1)
    out = tmp_path / "out"
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(whole_pad_run / name, out / name)
    (out / "checkpoint-4" / lost).unlink()
    capfd.readouterr()
    assert main(pad_args(tiny_bert_dir, glue_dir, out)) == 0
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith(("warning", "error"))]
    assert warnings == [f"warning: {out / 'checkpoint-4'} is incomplete (no {lost}; a run stopped while saving it): "
                        f"not resumed from"]
    assert tree_digest(out / "checkpoint-2") == tree_digest(whole_pad_run / "checkpoint-2")
    assert (out / "checkpoint-4" / lost).is_file()
    assert metric_values(read_json(out / "all_results.json")) == metric_values(read_json(whole_pad_run / "all_results.json"))


def test_resume_from_an_incomplete_checkpoint_is_refused(whole_pad_run, tiny_bert_dir, glue_dir, tmp_path, capfd):
    checkpoint = shutil.copytree(whole_pad_run / "checkpoint-2", tmp_path / "checkpoint-2")
    (checkpoint / "trainer_state.json").unlink()
    code, errors = run_cli(pad_args(tiny_bert_dir, glue_dir, tmp_path / "out", "--resume_from_checkpoint",
                                    str(checkpoint)), capfd)
    assert code == 2
    assert errors == [f"error: --resume_from_checkpoint {checkpoint}: incomplete checkpoint (no trainer_state.json)"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".lock"]


# ---------------------------------------------------------------- one run per folder

def test_a_second_run_into_a_locked_folder_is_refused(tiny_bert_dir, glue_dir, tmp_path, capfd):
    out = tmp_path / "busy"
    out.mkdir()
    with folder_locked_by_another_process(out) as holder:
        code, errors = run_cli(base_args(tiny_bert_dir, glue_dir, out, "sst2", "--do_train", "--max_steps", "1"), capfd)
        assert code == 2 and len(errors) == 1
        assert errors[0].startswith(f"error: --output_dir {out} is in use by another run (pid {holder.pid} on host ")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    assert main(base_args(tiny_bert_dir, glue_dir, out, "sst2", "--do_eval")) == 0  # released when its holder died


# ---------------------------------------------------------------- a resume is the same run

@pytest.mark.parametrize("flag, value, shown, recorded", [
    ("--top_k", "3", "3", "2"), ("--num_experts", "2", "2", "4"), ("--moe", "moe", "'moe'", "'pad'"),
    ("--moe_layers", "intermediate", "'intermediate'", "'both'"), ("--dynamic_ratio", "0.3", "0.3", "0.5"),
    ("--partition_criterion", "random", "'random'", "'taylor'"), ("--seed", "1", "1", "0"),
    ("--learning_rate", "0.01", "0.01", "0.001"), ("--per_device_train_batch_size", "4", "4", "8"),
    ("--max_seq_length", "32", "32", "24"), ("--task_name", "mnli", "'mnli'", "'sst2'"),
])
def test_a_resume_that_changes_the_run_is_refused_by_name(whole_pad_run, tiny_bert_dir, glue_dir, tmp_path, capfd,
                                                        flag, value, shown, recorded):
    out = tmp_path / "out"
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(whole_pad_run / name, out / name)
    before = tree_digest(out)
    code, errors = run_cli(pad_args(tiny_bert_dir, glue_dir, out, "--max_steps", "6", flag, value), capfd)
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith(f"error: {flag} is {shown}, but checkpoint {out / 'checkpoint-4'} was trained with "
                                f"{recorded}: a resume continues the same run")
    assert tree_digest(out) == {".lock": tree_digest(out)[".lock"], **before}


# ---------------------------------------------------------------- failed writes

@pytest.mark.parametrize("target, errno_", [("checksums.json", 28), ("partition.json", 30), ("run_args.json", 5)])
def test_a_failed_write_is_one_error_line_and_keeps_the_last_good_checkpoint(whole_pad_run, tiny_bert_dir, glue_dir,
                                                                           tmp_path, monkeypatch, capfd, target,
                                                                           errno_):
    """ENOSPC, EROFS, EIO while checkpoint-4 is saved: one line naming the file, exit 2, checkpoint-2 as it was,
    no temporary file left; the rerun passes the unfinished checkpoint-4 over and ends as the uninterrupted run."""
    torch.set_num_threads(1)
    out = tmp_path / "out"
    shutil.copytree(whole_pad_run / "checkpoint-2", out / "checkpoint-2")
    before = tree_digest(out / "checkpoint-2")
    fail_writes_to(monkeypatch, (target,), errno_)
    code, errors = run_cli(pad_args(tiny_bert_dir, glue_dir, out), capfd)
    assert code == 2
    assert errors == [f"error: cannot write {out / 'checkpoint-4' / target}: {os.strerror(errno_)}"]
    assert tree_digest(out / "checkpoint-2") == before
    assert not list(out.rglob("*.tmp")) and not (out / "model.safetensors").exists()
    assert not (out / "checkpoint-4" / "trainer_state.json").exists()  # incomplete: written before the state
    monkeypatch.undo()
    capfd.readouterr()
    assert main(pad_args(tiny_bert_dir, glue_dir, out)) == 0
    assert [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning")] == [
        f"warning: {out / 'checkpoint-4'} is incomplete (no optimizer.pt, scheduler.pt, trainer_state.json; a run "
        f"stopped while saving it): not resumed from"]
    assert metric_values(read_json(out / "all_results.json")) == metric_values(read_json(whole_pad_run / "all_results.json"))


def test_a_failed_trainer_save_names_its_file(whole_pad_run, tiny_bert_dir, glue_dir, tmp_path, monkeypatch, capfd):
    """A write of the Trainer's own (here its optimizer state) fails: one line naming the file, exit 2."""
    out = tmp_path / "out"
    shutil.copytree(whole_pad_run / "checkpoint-2", out / "checkpoint-2")
    target = out / "checkpoint-4" / "optimizer.pt"

    def no_space(*args, **kwargs):
        raise OSError(28, os.strerror(28), str(target))
    monkeypatch.setattr(run_glue.MoETrainer, "_save_optimizer_and_scheduler", no_space)
    code, errors = run_cli(pad_args(tiny_bert_dir, glue_dir, out), capfd)
    assert code == 2 and errors == [f"error: {target}: {os.strerror(28)}"]


def test_a_stop_signal_in_a_resumed_run_names_the_checkpoint_to_resume(whole_pad_run, tiny_bert_dir, glue_dir,
                                                                      tmp_path, monkeypatch, capfd):
    """Rerunning a command with --resume_from_checkpoint would start from the old checkpoint again: the line
    names the new one instead."""
    torch.set_num_threads(1)
    out = tmp_path / "out"
    shutil.copytree(whole_pad_run / "checkpoint-2", out / "checkpoint-2")
    signal_during_step(monkeypatch, 3, signal.SIGTERM)
    capfd.readouterr()
    assert main(pad_args(tiny_bert_dir, glue_dir, out, "--resume_from_checkpoint", str(out / "checkpoint-2"))) == 143
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith(("stopped", "error"))]
    saved = out / "checkpoint-3"
    assert lines == [f"stopped by SIGTERM: saved {saved}; rerun with --resume_from_checkpoint {saved} to continue"]
    monkeypatch.undo()
    assert main(pad_args(tiny_bert_dir, glue_dir, out, "--resume_from_checkpoint", str(saved))) == 0
    assert metric_values(read_json(out / "all_results.json")) == metric_values(read_json(whole_pad_run / "all_results.json"))


def test_partition_granularity_is_compared_only_while_imp_is_to_come(whole_pad_run, tiny_bert_dir, glue_dir, tmp_path,
                                                                     capfd):
    """A partitioned checkpoint's masks decide the granularity (a resume keeps them whatever the flag says);
    a checkpoint saved before IMP (no partition.json) refuses a changed --partition_granularity."""
    out = tmp_path / "out"
    shutil.copytree(whole_pad_run / "checkpoint-4", out / "checkpoint-4")
    (out / "checkpoint-4" / "partition.json").unlink()
    code, errors = run_cli(pad_args(tiny_bert_dir, glue_dir, out, "--max_steps", "6", "--partition_granularity",
                                    "unit"), capfd)
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("error: --partition_granularity is 'unit', but checkpoint ")
