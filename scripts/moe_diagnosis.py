#!/usr/bin/env python
"""Why does fully dynamic MoE trail the dense model at CPU scale? Measurements on trained runs.

    python scripts/moe_diagnosis.py RUN_DIR [RUN_DIR ...] --glue_dir data/glue --task_name sst2 \\
        [--pretrained PATH] [--max_seq_length 64] [--eval_samples 500] [--noise_draws 3] [--output FILE]

Each RUN_DIR is the output directory of ``moe/run_glue.py`` (dense, MoE or PAD-MoE) with its trained
weights: the run records committed under ``results/runs`` keep none, so diagnose runs trained here.
``--output`` writes the report (headed by the command) to FILE instead of printing it.
For every run it prints one markdown block with

* accuracy on the first ``--eval_samples`` dev examples with the model's own (deterministic)
  eval routing, with training-style noisy routing (gate noise on, dropout off; mean over
  ``--noise_draws`` draws), and with every MoE layer replaced by the mean of its experts
  (routing then does not matter, since the gates of a token sum to 1);
* per MoE layer (dev tokens, real tokens only): the Frobenius norm of ``W_g``, the standard
  deviation of the clean logits ``x W_g`` over tokens and experts, the mean noise standard
  deviation ``softplus(x W_noise)``, and the expert load (share of top-k assignments, min/max
  over experts) in eval routing and in noisy routing;
* how far the experts moved: ``||W_e - W_0|| / ||W_0||`` (mean over experts and layers) with
  ``W_0`` the pretrained dense weight, how far apart they are (``||W_e - mean_e W_e|| / ||W_0||``),
  how far their mean moved, and the drift of the dense run's trained layers;
* the learning curve logged by the Trainer (``task_loss`` per logging step, ``eval_accuracy``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from moe import glue
from pad.runtime import OneLineParser, UsageError, atomic_write, read_json, report_error
from moe.modeling import MoELinear, _feed_forward_blocks, load_model, moe_layers
from moe.run_glue import default_model_path


def dev_batches(tokenizer, glue_dir: str, task: str, n: int, max_length: int, batch_size: int = 100):
    spec = glue.get_task(task)
    split = "validation_matched" if spec.name == "mnli" else "validation"
    data = glue.load_glue_dir(spec, glue_dir, [split])[split]
    data = data.select(range(min(n, len(data))))
    texts = [list(data[c]) for c in spec.text_columns]
    enc = tokenizer(*texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    labels = torch.tensor(list(data["label"]))
    return [({k: v[i:i + batch_size] for k, v in enc.items()}, labels[i:i + batch_size])
            for i in range(0, len(labels), batch_size)]


@torch.no_grad()
def accuracy(model, batches) -> float:
    correct = total = 0
    for inputs, labels in batches:
        correct += (model(**inputs).logits.argmax(-1) == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / total


def set_gate_noise(model, noisy: bool) -> None:
    """Model in eval mode (no dropout); the gates route with training noise iff ``noisy``."""
    model.eval()
    for layer in moe_layers(model).values():
        layer.gate.train(noisy)


@torch.no_grad()
def mean_expert_copy(model):
    """A copy whose MoE layers hold ``E`` copies of their mean expert (weights and biases)."""
    import copy
    averaged = copy.deepcopy(model)
    for layer in moe_layers(averaged).values():
        weights = layer.expert_weights()                 # (E, out, in), PAD mixing included
        mean = weights.mean(0, keepdim=True).expand_as(weights)
        if hasattr(layer.experts, "static_weight"):
            layer.experts.mask.fill_(1.0)
            layer.experts.scale.variant = "none"
        layer.experts.kernels.copy_(mean)
        if layer.bias is not None:
            layer.bias.copy_(layer.bias.mean(0, keepdim=True).expand_as(layer.bias))
    return averaged


@torch.no_grad()
def routing_statistics(model, batches) -> dict[str, dict[str, float]]:
    """Per MoE layer: gate norm, clean-logit std, mean noise std, eval and noisy expert load."""
    inputs_seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, layer in moe_layers(model).items():
        def keep(module, args, name=name):
            mask = module.token_mask
            x = args[0].reshape(-1, module.in_features)
            inputs_seen.setdefault(name, []).append(x if mask is None else x[mask.reshape(-1) != 0])
        hooks.append(layer.register_forward_pre_hook(keep))
    set_gate_noise(model, False)
    for inputs, _ in batches:
        model(**inputs)
    for hook in hooks:
        hook.remove()
    stats = {}
    for name, layer in moe_layers(model).items():
        x = torch.cat(inputs_seen[name]).float()
        gate = layer.gate
        clean = x @ gate.w_gate.float()
        noise_std = F.softplus(x @ gate.w_noise.float())
        loads = {}
        for mode in ("eval", "noisy"):
            gate.train(mode == "noisy")
            counts = gate(x).expert_counts
            loads[mode] = (counts / counts.sum()).tolist()
        gate.eval()
        stats[name] = {"gate_norm": gate.w_gate.norm().item(), "clean_logit_std": clean.std().item(),
                       "noise_std": noise_std.mean().item(),
                       "eval_load_min": min(loads["eval"]), "eval_load_max": max(loads["eval"]),
                       "noisy_load_min": min(loads["noisy"]), "noisy_load_max": max(loads["noisy"])}
    return stats


@torch.no_grad()
def relative_drift(model, pretrained) -> dict[str, float]:
    """``||W - W_0|| / ||W_0||`` over the feed-forward layers: per expert (mean) for MoE layers."""
    trained = [getattr(b, p).dense for _, b in _feed_forward_blocks(model) for p in ("intermediate", "output")]
    start = [getattr(b, p).dense for _, b in _feed_forward_blocks(pretrained) for p in ("intermediate", "output")]
    drifts, spreads, mean_drifts = [], [], []
    for layer, dense in zip(trained, start):
        w0 = dense.weight
        if isinstance(layer, MoELinear):
            weights = layer.expert_weights()
            drifts.append(((weights - w0).flatten(1).norm(dim=1) / w0.norm()).mean().item())
            spreads.append(((weights - weights.mean(0)).flatten(1).norm(dim=1) / w0.norm()).mean().item())
            mean_drifts.append(((weights.mean(0) - w0).norm() / w0.norm()).item())
        else:
            drifts.append(((layer.weight - w0).norm() / w0.norm()).item())
    out = {"drift_from_pretrained": sum(drifts) / len(drifts)}
    if spreads:
        out["expert_spread_around_mean"] = sum(spreads) / len(spreads)
        out["mean_expert_drift"] = sum(mean_drifts) / len(mean_drifts)
    return out


def learning_curve(run: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    state = run / "trainer_state.json"
    if not state.is_file():
        return [], []
    history = read_json(state).get("log_history")
    if not isinstance(history, list):
        raise UsageError(f"{state}: no log_history list")
    losses = [(h["step"], h.get("task_loss", h.get("loss"))) for h in history if "loss" in h]
    evals = [(h["step"], 100 * h["eval_accuracy"]) for h in history if "eval_accuracy" in h]
    return losses, evals


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_run(run: Path) -> None:
    """``run`` holds a trained model (config and weights), or :class:`UsageError` naming it."""
    if not run.is_dir():
        raise UsageError(f"{run} is not a folder")
    if not (run / "config.json").is_file() or not any((run / name).is_file() for name in WEIGHT_FILES):
        raise UsageError(f"{run} holds no trained model (config.json and {' or '.join(WEIGHT_FILES)}); "
                         "committed run records keep no weights: train the run here first")


def report(run: Path, args, pretrained) -> str:
    config = AutoConfig.from_pretrained(run)
    model = load_model(run, config).eval()
    tokenizer = AutoTokenizer.from_pretrained(run)
    batches = dev_batches(tokenizer, args.glue_dir, args.task_name, args.eval_samples, args.max_seq_length)
    lines = [f"### {run.name} ({(getattr(config, 'moe', None) or {'moe': 'none'})['moe']})", ""]
    acc = {"eval routing": accuracy(model, batches)}
    if moe_layers(model):
        torch.manual_seed(0)
        noisy = []
        for _ in range(args.noise_draws):
            set_gate_noise(model, True)
            noisy.append(accuracy(model, batches))
        acc[f"noisy routing (mean of {args.noise_draws})"] = sum(noisy) / len(noisy)
        acc["mean expert"] = accuracy(mean_expert_copy(model).eval(), batches)
        set_gate_noise(model, False)
    lines.append("accuracy: " + ", ".join(f"{k} {v:.1f}" for k, v in acc.items()))
    drift = relative_drift(model, pretrained)
    lines.append("weights: " + ", ".join(f"{k} {v:.4f}" for k, v in drift.items()))
    if moe_layers(model):
        lines += ["", "| layer | ‖W_g‖ | std(x W_g) | mean noise std | eval load min/max | noisy load min/max |",
                  "|---|---|---|---|---|---|"]
        for name, s in routing_statistics(model, batches).items():
            short = name.replace("bert.encoder.layer.", "L").replace(".dense", "")
            lines.append(f"| {short} | {s['gate_norm']:.3f} | {s['clean_logit_std']:.3f} | {s['noise_std']:.3f} | "
                         f"{s['eval_load_min']:.3f} / {s['eval_load_max']:.3f} | "
                         f"{s['noisy_load_min']:.3f} / {s['noisy_load_max']:.3f} |")
    losses, evals = learning_curve(run)
    if losses:
        lines.append("")
        lines.append("task loss by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in losses))
    if evals:
        lines.append("dev accuracy by step: " + ", ".join(f"{s}: {v:.1f}" for s, v in evals))
    return "\n".join(lines) + "\n"


def without_output(argv: list[str]) -> list[str]:
    """The command line's arguments less ``--output FILE`` (where the report goes is not what it measured)."""
    kept, skip = [], False
    for arg in argv:
        if not skip and arg != "--output" and not arg.startswith("--output="):
            kept.append(arg)
        skip = arg == "--output"
    return kept


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--glue_dir", default="data/glue")
    parser.add_argument("--task_name", default="sst2")
    parser.add_argument("--pretrained", default=None, help="the dense model the runs started from")
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--eval_samples", type=int, default=500)
    parser.add_argument("--noise_draws", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None, help="write the report here instead of printing it")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        args = parser.parse_args(argv)
        for flag in ("max_seq_length", "eval_samples", "noise_draws"):
            if getattr(args, flag) < 1:
                raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
        for run in args.runs:
            check_run(run)
        pretrained = AutoModelForSequenceClassification.from_pretrained(args.pretrained or default_model_path()).eval()
        reports = [report(run, args, pretrained) for run in args.runs]
        if args.output is None:
            print("\n".join(reports))
        else:
            header = f"Produced by `python scripts/moe_diagnosis.py {' '.join(without_output(argv))}`.\n\n"
            atomic_write(args.output, header + "\n".join(reports))
    except (UsageError, OSError, ValueError) as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
