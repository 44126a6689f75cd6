"""MoE correctness: real-token routing statistics, informative PAD partitions from the configs,
the nn.DataParallel refusal, weight decay of phi, and the PAD-MoE compact export."""
import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForSequenceClassification, TrainingArguments

import pad
from pad.partition import score_positions
from conftest import tiny_bert_config
from moe.gating import NoisyTopKGate
from moe.modeling import (COMPACT_WEIGHTS, MoELinear, aux_loss, convert_to_moe, expert_load, load_model,
                          moe_layers, save_compact_model)
from moe.run_glue import main
from moe.trainer import MoETrainer, check_not_data_parallel, is_scale_factor
from test_run_glue import base_args, make_glue_dir

torch.set_num_threads(1)

F64 = torch.float64
REPO = Path(__file__).resolve().parents[1]
PAD_CONFIGS = ["bert_base_pad.json", "minilm_quick.json", "minilm_mini.json"]


@pytest.fixture
def noise_draws_zero(monkeypatch):
    """The gate's N(0, 1) draws are 0: the training path (smooth load through the noise std)
    routes a padded and an unpadded call identically."""
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)


def random_gate(training, seed=0, in_features=8, num_experts=6, top_k=2):
    torch.manual_seed(seed)
    gate = NoisyTopKGate(in_features, num_experts, top_k).to(F64).train(training)
    with torch.no_grad():
        gate.w_gate.normal_()
        gate.w_noise.normal_()
    return gate


# ---------------------------------------------------------------- routing statistics: real tokens only

@pytest.mark.parametrize("training", [False, True])
def test_gate_statistics_ignore_padding(training, noise_draws_zero):
    gate = random_gate(training)
    real = torch.randn(7, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    padding = torch.randn(5, 8, dtype=F64, generator=torch.Generator().manual_seed(2)) * 10
    mixed = torch.cat([real[:3], padding[:4], real[3:], padding[4:]])
    mask = torch.tensor([1] * 3 + [0] * 4 + [1] * 4 + [0])
    alone, padded = gate(torch.cat([real])), gate(mixed, mask)
    torch.testing.assert_close(padded.aux_loss, alone.aux_loss, rtol=1e-12, atol=0)
    assert torch.equal(padded.expert_counts, alone.expert_counts)
    assert padded.expert_counts.sum() == 7 * 2
    # padding is still routed (its outputs are computed), it is only left out of the statistics
    assert padded.gates.shape == (12, 6)
    unmasked = gate(mixed)
    assert unmasked.expert_counts.sum() == 12 * 2 and not torch.equal(unmasked.aux_loss, alone.aux_loss)
    with pytest.raises(ValueError, match=r"token mask of shape \(11,\) does not match 12 tokens"):
        gate(mixed, mask[:-1])


@pytest.mark.parametrize("moe", ["moe", "pad"])
@pytest.mark.parametrize("training", [False, True])
def test_moe_layer_statistics_equal_those_of_the_real_tokens_alone(moe, training, noise_draws_zero):
    torch.manual_seed(0)
    layer = MoELinear(8, 5, num_experts=4, top_k=2, moe=moe).to(F64).train(training)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(3, 6, 8, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    layer.token_mask = mask
    padded_out = layer(x)
    padded_aux, padded_counts = layer.last_aux_loss, layer.last_expert_counts
    layer.token_mask = None
    real_out = layer(x[mask.bool()])
    torch.testing.assert_close(padded_aux, layer.last_aux_loss, rtol=1e-12, atol=0)
    assert torch.equal(padded_counts, layer.last_expert_counts)
    torch.testing.assert_close(padded_out[mask.bool()], real_out, rtol=1e-12, atol=1e-12)
    layer.token_mask = mask[:, :5]
    with pytest.raises(ValueError, match=r"token mask of shape \(3, 5\) does not match the input's tokens \(3, 6\)"):
        layer(x)


def tiny_moe_bert(moe="moe", training=False):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(
        tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).to(F64)
    convert_to_moe(model, moe, num_experts=4, top_k=2)
    for layer in moe_layers(model).values():
        with torch.no_grad():
            layer.gate.w_gate.normal_()
            layer.gate.w_noise.normal_()
            layer.experts.kernels.add_(0.05 * torch.randn_like(layer.experts.kernels))
    return model.train(training)


@pytest.mark.parametrize("training", [False, True])
def test_model_aux_loss_and_load_of_a_padded_batch_equal_those_without_padding(training, noise_draws_zero):
    """The model hands its attention mask to every MoE layer: a sentence padded to 12 tokens gives
    the aux loss and expert load of the same sentence alone (BERT's real-token states are the same)."""
    model = tiny_moe_bert(training=training)
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    alone_aux, alone_load = aux_loss(model), expert_load(model)
    counts_alone = {n: m.last_expert_counts for n, m in moe_layers(model).items()}

    padded = torch.cat([ids, torch.zeros(1, 5, dtype=ids.dtype)], 1)
    mask = (padded != 0).long()
    model(input_ids=padded, attention_mask=mask)
    torch.testing.assert_close(aux_loss(model), alone_aux, rtol=1e-9, atol=0)
    for name, load in expert_load(model).items():
        torch.testing.assert_close(load, alone_load[name], rtol=1e-9, atol=0)
        assert torch.equal(moe_layers(model)[name].last_expert_counts, counts_alone[name])
        assert moe_layers(model)[name].last_expert_counts.sum() == 7 * 2
    # a positional attention mask reaches the layers too, and no mask is left behind after a call
    model(padded, mask)
    torch.testing.assert_close(aux_loss(model), alone_aux, rtol=1e-9, atol=0)
    assert all(m.token_mask is None for m in moe_layers(model).values())
    # without the mask every position counts, padding included
    model(input_ids=padded)
    assert all(m.last_expert_counts.sum() == 12 * 2 for m in moe_layers(model).values())


def test_reloaded_model_also_routes_statistics_over_real_tokens(tiny_bert_dir, tmp_path):
    model = convert_to_moe(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir), "pad", 4, 2)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, AutoConfig.from_pretrained(tmp_path)).eval()
    ids = torch.tensor([[2, 10, 11, 3, 0, 0]])
    loaded(input_ids=ids, attention_mask=(ids != 0).long())
    assert all(m.last_expert_counts.sum() == 4 * 2 for m in moe_layers(loaded).values())


# ---------------------------------------------------------------- PAD configs partition on informative scores

@pytest.mark.parametrize("config", PAD_CONFIGS)
def test_config_driven_pad_run_partitions_on_nonzero_scores(config, tiny_bert_dir, tmp_path, monkeypatch):
    """Each PAD config's warm-up makes the experts differ from W_s before IMP: the taylor scores
    IMP ranks are nonzero (at step 0 they are all exactly 0, see the last assertion)."""
    settings = json.loads((REPO / "configs" / "glue" / config).read_text())
    warmup = settings["partition_warmup_steps"]
    assert settings["moe"] == "pad" and settings.get("partition_criterion", "taylor") == "taylor" and warmup >= 1
    seen = []
    imp = pad.iterative_mode_partition

    def recording_imp(model, batches, loss_fn, *args, **kwargs):
        scores = score_positions(model, batches, loss_fn, "taylor")
        seen.append(torch.cat([s.flatten() for s in scores.values()]))
        return imp(model, batches, loss_fn, *args, **kwargs)

    monkeypatch.setattr(pad, "iterative_mode_partition", recording_imp)
    glue_dir = make_glue_dir(tmp_path / "glue")
    overrides = ["--model_name_or_path", str(tiny_bert_dir), "--glue_dir", str(glue_dir), "--task_name", "sst2",
                 "--output_dir", str(tmp_path / "out"), "--max_seq_length", "24",
                 "--per_device_train_batch_size", "8", "--max_steps", str(warmup + 1), "--max_train_samples", "32",
                 "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--do_eval", "false",
                 "--eval_strategy", "no", "--partition_batches", "2", "--partition_iterations", "2"]
    assert main([str(REPO / "configs" / "glue" / config), *overrides]) == 0
    assert json.loads((tmp_path / "out" / "partition.json").read_text())["step"] == warmup
    (scores,) = seen
    assert (scores == 0).float().mean() < 0.01 and scores.unique().numel() > 0.9 * scores.numel()

    seen.clear()
    assert main([str(REPO / "configs" / "glue" / config), *overrides, "--partition_warmup_steps", "0",
                 "--output_dir", str(tmp_path / "at_step_0")]) == 0
    assert torch.all(seen[0] == 0)


def test_docs_state_the_cpu_configs_warmup():
    cpu_configs = ("minilm_quick.json", "minilm_mini.json", "minilm_protocol.json")
    warmups = {json.loads((REPO / "configs" / "glue" / name).read_text())["partition_warmup_steps"]
               for name in cpu_configs}
    assert len(warmups) == 1, f"the CPU-scale configs disagree on the warm-up: {warmups}"
    bert_base = json.loads((REPO / "configs" / "glue" / "bert_base_pad.json").read_text())["partition_warmup_steps"]
    doc = " ".join((REPO / "docs" / "moe.md").read_text().split())  # line breaks do not matter
    assert f"The CPU-scale configs use {warmups.pop()} warm-up steps" in doc
    assert f"`configs/glue/bert_base_pad.json` uses {bert_base} steps" in doc


# ---------------------------------------------------------------- nn.DataParallel is refused

def fake_gpus(monkeypatch, n):
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: n))


@pytest.mark.parametrize("moe", ["moe", "pad"])
def test_training_moe_under_data_parallel_is_refused(moe, tiny_bert_dir, tmp_path, monkeypatch):
    fake_gpus(monkeypatch, 2)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    model = convert_to_moe(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir), moe, 4, 2)
    with pytest.raises(ValueError, match=r"nn.DataParallel\) is not supported.*torchrun --nproc_per_node=2"):
        MoETrainer(model=model, args=args, train_dataset=[{}])
    MoETrainer(model=model, args=args)  # evaluation only: the forward pass is right on replicas
    dense = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    check_not_data_parallel(args, dense, training=True)  # dense models train under DataParallel as before
    fake_gpus(monkeypatch, 1)
    check_not_data_parallel(TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"), model,
                            training=True)


def test_cli_refuses_data_parallel_moe_training_with_one_error_line(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    glue_dir = make_glue_dir(tmp_path / "glue")
    bad_flag_code = main(base_args(tiny_bert_dir, glue_dir, tmp_path / "bad", "sst2", "--moe", "pad", "--do_train",
                                   "--partition_warmup_steps", "-1"))
    capsys.readouterr()
    fake_gpus(monkeypatch, 4)
    code = main(base_args(tiny_bert_dir, glue_dir, tmp_path / "dp", "sst2", "--moe", "moe", "--do_train"))
    err = capsys.readouterr().err
    assert code == bad_flag_code != 0 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line.lower()] == ["error: MoE training on 4 GPUs in one process (nn.DataParallel) is not supported: the gates' "
                   "aux loss would be lost; run one process per GPU with torchrun --nproc_per_node=4 "
                   "moe/run_glue.py ..., or one GPU (CUDA_VISIBLE_DEVICES=0)"]
    assert not (tmp_path / "dp" / "model.safetensors").exists()


# ---------------------------------------------------------------- weight decay

def test_weight_decay_skips_phi_biases_and_layernorm_like_dyconv(tiny_bert_dir, tmp_path):
    model = convert_to_moe(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir), "pad", 4, 2)
    trainer = MoETrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                             report_to="none", weight_decay=0.01))
    decayed = set(trainer.get_decay_parameter_names(model))
    names = [n for n, _ in model.named_parameters()]
    phis = [n for n in names if is_scale_factor(n)]
    assert len(phis) == 4 and not decayed & set(phis)
    assert not any("LayerNorm" in n or n.endswith("bias") for n in decayed)
    expected = {n for n in names if n.endswith(("kernels", "static_weight", "w_gate", "w_noise"))
                or (n.endswith(".weight") and "LayerNorm" not in n)}
    assert decayed == expected
    optimizer = trainer.create_optimizer()
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    params = dict(model.named_parameters())
    assert all(id(params[n]) in no_decay for n in phis)
    assert all(id(params[n]) not in no_decay for n in expected)


# ---------------------------------------------------------------- PAD-MoE compact export

def trained_looking_pad(tiny_bert_dir):
    model = convert_to_moe(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir), "pad", 4, 2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in moe_layers(model).values():
            layer.experts.kernels.add_(0.1 * torch.randn(layer.experts.kernels.shape, generator=g))
            layer.gate.w_gate.normal_(generator=g)
            layer.experts.scale.phi.fill_(0.4)
            mask = layer.experts.mask
            mask.copy_((torch.rand(mask.shape, generator=g) < 0.5).to(mask.dtype))
    return model.eval()


def test_compact_export_round_trip_gives_identical_logits(tiny_bert_dir, tmp_path):
    model = trained_looking_pad(tiny_bert_dir)
    ids = torch.tensor([[2, 10, 11, 12, 3, 0], [2, 13, 14, 15, 16, 3]])
    inputs = dict(input_ids=ids, attention_mask=(ids != 0).long())
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    path = save_compact_model(model, tmp_path)
    assert path == tmp_path / COMPACT_WEIGHTS
    assert path.stat().st_size < (tmp_path / "model.safetensors").stat().st_size
    (tmp_path / "model.safetensors").unlink()  # the compact file and config.json are the whole model
    loaded = load_model(tmp_path, AutoConfig.from_pretrained(tmp_path)).eval()
    assert torch.equal(loaded(**inputs).logits, expected)
    for a, b in zip(moe_layers(model).values(), moe_layers(loaded).values()):
        assert torch.equal(a.experts.mask, b.experts.mask)
    with pytest.raises(ValueError, match="no PAD layers"):
        save_compact_model(convert_to_moe(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir), "moe",
                                          4, 2), tmp_path / "moe")
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=f"cannot read {path}"):
        load_model(tmp_path, AutoConfig.from_pretrained(tmp_path))


def test_run_glue_writes_the_compact_export_of_a_pad_run(tiny_bert_dir, tmp_path):
    glue_dir = make_glue_dir(tmp_path / "glue")
    out = tmp_path / "pad"
    assert main(base_args(tiny_bert_dir, glue_dir, out, "sst2", "--moe", "pad", "--do_train", "--max_steps", "2",
                          "--do_eval")) == 0
    config = AutoConfig.from_pretrained(out)
    full = load_model(out, config).eval()
    compact_only = tmp_path / "compact_only"
    compact_only.mkdir()
    for name in ("config.json", COMPACT_WEIGHTS):
        (compact_only / name).write_bytes((out / name).read_bytes())
    compact = load_model(compact_only, config).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    assert torch.equal(compact(input_ids=ids).logits, full(input_ids=ids).logits)
    # fully dynamic MoE has nothing compact to write
    moe_out = tmp_path / "moe"
    assert main(base_args(tiny_bert_dir, glue_dir, moe_out, "sst2", "--moe", "moe", "--do_train",
                          "--max_steps", "1")) == 0
    assert (moe_out / "model.safetensors").exists() and not (moe_out / COMPACT_WEIGHTS).exists()
