"""Benchmark: cost of DY-Conv and PAD-DY-Conv relative to the static model, per-layer schemes, stored parameters.

Everything is measured in one run, against the static model of the same arch measured
in the same run, with the models built by ``dyconv.models.build_model`` as a user would
(default allocator unless ``--keep-freed-memory``):

* time, median over ``--repeats`` interleaved rounds (each round times every model once,
  after one warm-up call each): the training step (forward + backward of ``logits.sum()``
  in training mode) and inference (eval mode, ``no_grad``) at ``--batch-size``, and
  inference at batch 1;
* peak memory above what was allocated before the pass: on CUDA
  ``torch.cuda.max_memory_allocated``; on CPU the peak of the bytes held by torch's
  allocator, summed at operator boundaries from ``torch.profiler`` (``profile_memory=True``),
  so a temporary allocated and freed inside one operator is not seen;
* the execution scheme every dynamic conv chose at each size (``--scheme`` forces one), and the
  path every layer of ``pad-unit`` took (:func:`dyconv.schemes.prefers_unit_path`);
* stored parameters of DY-Conv dense vs PAD compact (``pad.parameter_counts``)
  with a random mask at ``--dynamic-ratio`` (``pad.select_dynamic`` on random scores).

``pad-dyconv`` is the dense training form (all kernels stored, mask applied and the static
part folded into the kernels in every forward pass); ``pad-folded`` is its inference form
(:func:`dyconv.inference.to_inference`: folded kernels, no mask), timed in inference only.
``pad-unit`` is PAD-DY-Conv with a random *output-unit* mask at the same ratio (whole filters
static: where the layer takes the unit path they run as one ordinary conv, only the dynamic filters
through the dynamic scheme) and ``unit-folded`` its inference form (static filters stored as one
static weight).

Usage: ``python -m dyconv.bench [--mini] [--archs resnet18 mobilenetv2_100] [--sizes 112 224] ...``
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

import pad
from .inference import to_inference
from .layers import conv_schemes, dynamic_convs, set_conv_scheme
from .models import ARCHS, build_model
from .schemes import POLICIES

# (name, conv, pad, partition granularity)
VARIANTS = (("static", "static", False, None), ("dyconv", "dyconv", False, None),
            ("pad-dyconv", "dyconv", True, "element"), ("pad-unit", "dyconv", True, "unit"))
INFERENCE_VARIANTS = {"pad-folded": "pad-dyconv", "unit-folded": "pad-unit"}  # inference form: of which model
PASSES = ("train", "infer", "infer1")


def set_random_mask(model: nn.Module, dynamic_ratio: float, seed: int = 0, granularity: str = "element") -> None:
    """Keeps a uniformly random ``dynamic_ratio`` of all PAD positions dynamic (global scope), whole
    units of ``granularity`` at a time."""
    banks = dict(pad.weight_banks(model))
    generator = torch.Generator().manual_seed(seed)
    scores = {name: torch.rand(bank.mask.shape, generator=generator) for name, bank in banks.items()}
    with torch.no_grad():
        pad.select_dynamic(banks, scores, dynamic_ratio, "global", granularity=granularity)


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def forward_pass(model: nn.Module, x: torch.Tensor, amp: bool = False) -> Callable[[], None]:
    """Inference: eval mode, no autograd graph."""
    def run():
        model.eval()
        with torch.no_grad(), _autocast(x.device, amp):
            model(x)
    return run


def training_pass(model: nn.Module, x: torch.Tensor, amp: bool = False) -> Callable[[], None]:
    """Forward and backward of ``logits.sum()`` in training mode."""
    def run():
        model.train()
        model.zero_grad(set_to_none=True)
        with _autocast(x.device, amp):
            loss = model(x).float().sum()
        loss.backward()
    return run


def seconds(run: Callable[[], None], device: torch.device) -> float:
    """Wall time of one call (CUDA synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def peak_bytes(run: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by torch during ``run()`` above those live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    top_level = sorted((e for e in prof.events() if e.cpu_parent is None), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in top_level:
        live += event.cpu_memory_usage
        peak = max(peak, live)
    return peak


def build_variants(arch: str, kernels: int, dynamic_ratio: float, scheme: str, device: torch.device) -> dict:
    """``{variant name: model}``: static, DY-Conv, PAD-DY-Conv (random element and unit masks) of
    ``arch``, and the PAD models' inference forms (:func:`dyconv.inference.to_inference`, timed in
    inference only)."""
    models = {}
    for name, conv, use_pad, granularity in VARIANTS:
        torch.manual_seed(0)
        model = build_model(arch, conv, use_pad, kernels=kernels, conv_scheme=scheme).to(device)
        if use_pad:
            set_random_mask(model, dynamic_ratio, granularity=granularity)
        models[name] = model
        for inference_name, source in INFERENCE_VARIANTS.items():  # each right after its model
            if source == name:
                models[inference_name] = to_inference(model)
    return models


def measure(archs: Sequence[str], sizes: Sequence[int], batch_size: int, repeats: int, dynamic_ratio: float,
            kernels: int, device: torch.device, scheme: str = "auto", amp: bool = False) -> tuple[list[dict], dict]:
    """One row per (arch, size, variant): median seconds and peak bytes of each pass.

    Returns ``(rows, schemes)`` with ``schemes[(arch, size)]`` the PAD models' :func:`scheme_rows` at that size.
    """
    rows, schemes = [], {}
    progress = tqdm(total=len(archs) * len(sizes), desc="bench", file=sys.stderr, leave=False)
    for arch in archs:
        models = build_variants(arch, kernels, dynamic_ratio, scheme, device)
        for size in sizes:
            x = torch.randn(batch_size, 3, size, size, device=device)
            for model in models.values():  # only this size's choices recorded (made again alike: same rule)
                set_conv_scheme(model, scheme)
            runs = {(name, label): make(model, inputs, amp) for name, model in models.items()
                    for label, make, inputs in (("train", training_pass, x), ("infer", forward_pass, x),
                                                ("infer1", forward_pass, x[:1]))
                    if not (label == "train" and name in INFERENCE_VARIANTS)}
            for run in runs.values():
                run()  # warm-up: first-call allocations, kernel selection, scheme choice
            times = {key: [] for key in runs}
            for _ in range(repeats):  # interleaved: load changes hit every model alike
                for key, run in runs.items():
                    times[key].append(seconds(run, device))
            for name in models:
                row = {"arch": arch, "size": size, "model": name}
                for label in PASSES:
                    row[f"{label}_s"] = statistics.median(times[(name, label)]) if (name, label) in runs else None
                for label in ("train", "infer"):
                    row[f"{label}_bytes"] = peak_bytes(runs[(name, label)], device) if (name, label) in runs else None
                rows.append(row)
            schemes[(arch, size)] = scheme_rows(models["pad-dyconv"], models["pad-unit"])
            progress.update()
        del models
    progress.close()
    return rows, schemes


def parameter_rows(archs: Sequence[str], dynamic_ratio: float, kernels: int) -> list[dict]:
    """Stored parameters of each arch: static, DY-Conv, PAD-DY-Conv dense and compact."""
    rows = []
    for arch in archs:
        static = pad.parameter_counts(build_model(arch))["dense"]
        dynamic = pad.parameter_counts(build_model(arch, "dyconv", kernels=kernels))["dense"]
        partial = build_model(arch, "dyconv", pad=True, kernels=kernels)
        set_random_mask(partial, dynamic_ratio)
        counts = pad.parameter_counts(partial)
        rows.append({"arch": arch, "static": static, "dyconv": dynamic, "pad_dense": counts["dense"],
                     "pad_compact": counts["compact"], "achieved_ratio": pad.dynamic_ratio(partial)})
        del partial
    return rows


def format_timing(rows: list[dict]) -> str:
    header = (f"{'arch':<16} {'size':>5} {'model':<11} {'train ms':>9} {'x':>6} {'infer ms':>9} {'x':>6} "
              f"{'infer1 ms':>9} {'x':>6} {'train MiB':>10} {'x':>6} {'infer MiB':>10} {'x':>6}")
    lines = [header, "-" * len(header)]
    baseline = {(r["arch"], r["size"]): r for r in rows if r["model"] == "static"}
    for r in rows:
        base = baseline[(r["arch"], r["size"])]
        def cell(key: str, scale: float, width: int) -> str:
            if r[key] is None:
                return f"{'-':>{width}} {'-':>6}"
            ratio = r[key] / base[key] if base[key] else float("nan")
            return f"{scale * r[key]:>{width}.1f} {ratio:>6.2f}"

        cells = [cell(f"{p}_s", 1e3, 9) for p in PASSES] + [cell(f"{p}_bytes", 2**-20, 10) for p in ("train", "infer")]
        lines.append(f"{r['arch']:<16} {r['size']:>5} {r['model']:<11} " + " ".join(cells))
    return "\n".join(lines)


def scheme_rows(model: nn.Module, unit_model: nn.Module) -> list[dict]:
    """Every dynamic conv of ``model``: name, shape, the schemes it chose and the paths the same layer of
    ``unit_model`` (a unit mask) took (:func:`conv_schemes`)."""
    recorded, unit = conv_schemes(model), conv_schemes(unit_model)
    return [{"name": name, "chosen": recorded[name]["chosen"], "paths": unit[name]["paths"],
             "shape": f"{layer.kernel_size}x{layer.kernel_size} {layer.in_channels}->{layer.out_channels}"
                      + (" dw" if layer.groups > 1 else "") + (f" /{layer.stride}" if layer.stride > 1 else "")}
            for name, layer in dynamic_convs(model)]


def format_schemes(schemes: dict) -> str:
    """Per (arch, size): every dynamic conv's shape, input size, scheme and ``pad-unit``'s path (``-`` for
    a layer without a unit split: every filter dynamic), each at batch > 1 / at batch 1."""
    lines = ["execution scheme per layer of PAD-DY-Conv (DY-Conv chooses the same) and path of pad-unit: "
             "batch > 1 / batch 1"]
    for (arch, size), layers in schemes.items():
        counts: dict[str, int] = {}
        path_counts: dict[str, int] = {}
        body = []
        for layer in layers:
            def at(choices: dict, batch_class: str) -> str:
                return next((s for k, s in choices.items() if k.startswith(batch_class + "@")), "-")

            batch, single = at(layer["chosen"], "batch"), at(layer["chosen"], "single")
            path, path_single = at(layer["paths"], "batch"), at(layer["paths"], "single")
            where = next(iter(layer["chosen"]), "@?").split("@")[1]
            counts[batch] = counts.get(batch, 0) + 1
            path_counts[path] = path_counts.get(path, 0) + 1
            body.append(f"  {layer['name']:<28} {layer['shape']:<20} in {where:<8} {batch:>7} / {single:<7}  "
                        f"path {path:>7} / {path_single}")
        lines.append(f"{arch} {size} px: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                     + "; pad-unit paths: " + ", ".join(f"{k} {v}" for k, v in sorted(path_counts.items())))
        lines += body
    return "\n".join(lines)


def format_parameters(rows: list[dict], dynamic_ratio: float) -> str:
    header = (f"{'arch':<16} {'static':>12} {'dyconv':>12} {'pad dense':>12} {'pad compact':>12} "
              f"{'compact/dyconv':>14} {'ratio':>7}")
    lines = [f"stored parameters, dynamic ratio {dynamic_ratio} (random mask)", header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['arch']:<16} {r['static']:>12,} {r['dyconv']:>12,} {r['pad_dense']:>12,} "
                     f"{r['pad_compact']:>12,} {r['pad_compact'] / r['dyconv']:>14.3f} {r['achieved_ratio']:>7.4f}")
    return "\n".join(lines)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(prog="bench_dyconv", description=__doc__.split("\n")[0])
    parser.add_argument("--mini", action="store_true", help="quick CPU run: 112 px only, batch 8, 2 repeats")
    parser.add_argument("--archs", nargs="+", default=["resnet18", "mobilenetv2_100"], choices=ARCHS,
                        help="archs timed (default resnet18 mobilenetv2_100)")
    parser.add_argument("--sizes", type=int, nargs="+", help="image sizes (default 112 224; --mini: 112)")
    parser.add_argument("--repeats", type=int, help="interleaved timing rounds (default 10; --mini: 2)")
    parser.add_argument("--batch-size", type=int, help="default 32; --mini: 8")
    parser.add_argument("--kernels", type=int, default=4, help="DY-Conv kernels K")
    parser.add_argument("--dynamic-ratio", type=float, default=0.3)
    parser.add_argument("--scheme", choices=POLICIES, default="auto",
                        help="execution scheme of every dynamic conv (default auto: chosen per layer)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="call pad.keep_freed_memory() first (glibc keeps freed memory; default: the "
                             "allocator a user's own script gets)")
    parser.add_argument("--amp", action="store_true", help="autocast: bfloat16 on CPU, float16 on CUDA")
    parser.add_argument("--param-archs", nargs="+", default=["resnet18", "resnet50"], choices=ARCHS,
                        help="archs of the stored-parameter table")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([112] if args.mini else [112, 224])
    args.repeats = args.repeats or (2 if args.mini else 10)
    args.batch_size = args.batch_size if args.batch_size is not None else (8 if args.mini else 32)
    if min(args.sizes) < 32:
        raise ValueError(f"image sizes must be >= 32, got {args.sizes}")
    if args.batch_size < 1 or args.repeats < 1:
        raise ValueError(f"--batch-size and --repeats must be >= 1, got {args.batch_size} and {args.repeats}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.kernels < 1:
        raise ValueError(f"--kernels must be >= 1, got {args.kernels}")
    pad.check_dynamic_ratio(args.dynamic_ratio)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as err:
        print(f"bench_dyconv: error: {err}", file=sys.stderr)
        return 2
    allocator = "default allocator"
    if args.keep_freed_memory:
        allocator = "pad.keep_freed_memory()" if pad.keep_freed_memory() else "keep_freed_memory unavailable"
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{' '.join(args.archs)}, batch {args.batch_size}, {args.repeats} repeats, device {args.device} ({name}), "
          f"K={args.kernels}, PAD dynamic ratio {args.dynamic_ratio}, scheme {args.scheme}, {allocator}"
          + (", amp" if args.amp else ""))
    print("time: median over interleaved rounds; x: ratio to the static model of the same arch and size; "
          "infer1: batch 1; memory: peak bytes allocated by torch above those live before the pass "
          + ("(torch.cuda.max_memory_allocated)" if device.type == "cuda"
             else "(torch.profiler, at operator boundaries)"))
    rows, schemes = measure(args.archs, args.sizes, args.batch_size, args.repeats, args.dynamic_ratio, args.kernels,
                            device, args.scheme, args.amp)
    print(format_timing(rows))
    print()
    print(format_schemes(schemes))
    print()
    print(format_parameters(parameter_rows(args.param_archs, args.dynamic_ratio, args.kernels), args.dynamic_ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
