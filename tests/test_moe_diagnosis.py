"""scripts/moe_diagnosis.py on a tiny saved MoE model and a tiny GLUE folder."""
import re
import shutil

import torch
from transformers import AutoModelForSequenceClassification

import moe_diagnosis
from moe.modeling import convert_to_moe, moe_layers
from test_run_glue import make_glue_dir

torch.set_num_threads(1)


def saved_moe(tiny_bert_dir, path, moved):
    model = convert_to_moe(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir), "moe", 4, 2)
    if moved:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in moe_layers(model).values():
                layer.experts.kernels.add_(0.05 * torch.randn(layer.experts.kernels.shape, generator=g))
                layer.gate.w_gate.normal_(generator=g)
    model.save_pretrained(path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_bert_dir / name).exists():
            shutil.copy(tiny_bert_dir / name, path / name)
    return path


def test_diagnosis_of_untrained_and_moved_moe(tiny_bert_dir, tmp_path, capsys):
    glue = make_glue_dir(tmp_path / "glue", n_dev=8)
    untrained = saved_moe(tiny_bert_dir, tmp_path / "untrained", moved=False)
    moved = saved_moe(tiny_bert_dir, tmp_path / "moved", moved=True)
    assert moe_diagnosis.main([str(untrained), str(moved), "--glue_dir", str(glue), "--task_name", "sst2",
                               "--pretrained", str(tiny_bert_dir), "--max_seq_length", "24",
                               "--eval_samples", "8", "--noise_draws", "2"]) == 0
    first, second = capsys.readouterr().out.split("### ")[1:]
    # identical experts: routing cannot matter, the mean expert is the model, nothing moved
    accuracies = [float(v) for v in re.findall(r"(?:routing|expert)(?: \(mean of 2\))? ([\d.]+)", first)]
    assert len(accuracies) == 3 and len(set(accuracies)) == 1 and accuracies[0] % 12.5 == 0
    assert "drift_from_pretrained 0.0000, expert_spread_around_mean 0.0000, mean_expert_drift 0.0000" in first
    assert "noisy routing (mean of 2)" in first
    rows = [line for line in second.splitlines() if line.startswith("| L")]
    assert len(rows) == 4  # 2 layers x (intermediate, output)
    spread = float(re.search(r"expert_spread_around_mean ([\d.]+)", second).group(1))
    assert spread > 0


def test_report_to_file_is_headed_by_its_command(tiny_bert_dir, tmp_path, capsys):
    glue = make_glue_dir(tmp_path / "glue", n_dev=8)
    run = saved_moe(tiny_bert_dir, tmp_path / "run", moved=True)
    args = [str(run), "--glue_dir", str(glue), "--task_name", "sst2", "--pretrained", str(tiny_bert_dir),
            "--max_seq_length", "24", "--eval_samples", "8", "--noise_draws", "1"]
    out = tmp_path / "report.md"
    assert moe_diagnosis.main(args + ["--output", str(out)]) == 0
    assert capsys.readouterr().out == ""
    text = out.read_text()
    assert text.startswith(f"Produced by `python scripts/moe_diagnosis.py {' '.join(args)}`.\n\n### run (moe)")
    assert "expert_spread_around_mean" in text


def test_a_folder_without_trained_weights_is_one_error_line(tiny_bert_dir, tmp_path, capsys):
    records_only = tmp_path / "records"
    records_only.mkdir()
    (records_only / "all_results.json").write_text("{}")
    for folder, message in [(records_only, f"error: {records_only} holds no trained model (config.json and "
                                           "model.safetensors or pytorch_model.bin); committed run records keep no "
                                           "weights: train the run here first"),
                            (tmp_path / "missing", f"error: {tmp_path / 'missing'} is not a folder")]:
        out = tmp_path / "report.md"
        assert moe_diagnosis.main([str(folder), "--pretrained", str(tiny_bert_dir), "--output", str(out)]) == 2
        assert capsys.readouterr().err == message + "\n"
        assert not out.exists()


def test_bad_flags_are_one_error_line(tiny_bert_dir, tmp_path, capsys):
    run = saved_moe(tiny_bert_dir, tmp_path / "moe", moved=False)
    for flags, message in [(["--noise_draws", "0"], "error: --noise_draws must be >= 1, got 0"),
                           (["--eval_samples", "-5"], "error: --eval_samples must be >= 1, got -5"),
                           (["--noise_draws", "two"], "error: argument --noise_draws: invalid int value: 'two'")]:
        assert moe_diagnosis.main([str(run), "--pretrained", str(tiny_bert_dir), *flags]) == 2
        assert capsys.readouterr().err == message + "\n"
