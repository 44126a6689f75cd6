"""Benchmark: cost of DY-Conv and PAD-DY-Conv ResNet-18 relative to static ResNet-18, and stored parameters.

Everything is measured in one run, against the static model measured in the same run:

* time: ``torch.utils.benchmark.Timer`` (mean over ``--repeats`` calls after one warm-up
  call; it synchronises CUDA itself), forward in eval mode under ``no_grad``, and
  forward + backward of ``logits.sum()`` in training mode;
* peak memory above what was allocated before the pass: on CUDA
  ``torch.cuda.max_memory_allocated``; on CPU the peak of the bytes held by torch's
  allocator, summed at operator boundaries from ``torch.profiler`` (``profile_memory=True``),
  so a temporary allocated and freed inside one operator is not seen;
* stored parameters of ResNet DY-Conv dense vs PAD compact (``pad.parameter_counts``)
  with a random mask at ``--dynamic-ratio`` (``pad.select_dynamic`` on random scores).

The PAD model here is the dense training form (all kernels stored, mask applied in the
forward pass), so its time and memory are those of training, not of a compact deployment.

Usage: ``python -m dyconv.bench [--mini] [--sizes 112 224] [--batch-size 32] ...``
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.benchmark import Timer
from tqdm import tqdm

import pad
from .models import ARCHS, build_model

VARIANTS = (("static", "static", False), ("dyconv", "dyconv", False), ("pad-dyconv", "dyconv", True))


def set_random_mask(model: nn.Module, dynamic_ratio: float, seed: int = 0) -> None:
    """Keeps a uniformly random ``dynamic_ratio`` of all PAD positions dynamic (global scope)."""
    banks = dict(pad.weight_banks(model))
    generator = torch.Generator().manual_seed(seed)
    scores = {name: torch.rand(bank.mask.shape, generator=generator) for name, bank in banks.items()}
    with torch.no_grad():
        pad.select_dynamic(banks, scores, dynamic_ratio, "global")


def forward_pass(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Inference: eval mode, no autograd graph."""
    def run():
        model.eval()
        with torch.no_grad():
            model(x)
    return run


def training_pass(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Forward and backward of ``logits.sum()`` in training mode."""
    def run():
        model.train()
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    return run


def mean_seconds(run: Callable[[], None], repeats: int) -> float:
    run()  # warm-up: first-call allocations, kernel selection
    timer = Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
    return timer.timeit(repeats).mean


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


def measure(sizes: Sequence[int], batch_size: int, repeats: int, dynamic_ratio: float, kernels: int,
            device: torch.device) -> list[dict]:
    """One row per (size, variant): seconds and peak bytes of a forward and a training pass."""
    rows = []
    progress = tqdm(total=len(sizes) * len(VARIANTS), desc="bench", file=sys.stderr, leave=False)
    for name, conv, use_pad in VARIANTS:
        torch.manual_seed(0)
        model = build_model("resnet18", conv, use_pad, kernels=kernels).to(device)
        if use_pad:
            set_random_mask(model, dynamic_ratio)
        for size in sizes:
            x = torch.randn(batch_size, 3, size, size, device=device)
            row = {"size": size, "model": name}
            for label, make in (("forward", forward_pass), ("train", training_pass)):
                run = make(model, x)
                row[f"{label}_s"] = mean_seconds(run, repeats)
                row[f"{label}_bytes"] = peak_bytes(run, device)
            rows.append(row)
            progress.update()
        del model
    progress.close()
    return sorted(rows, key=lambda r: r["size"])  # stable: variants keep their order within a size


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
    header = (f"{'size':>5} {'model':<11} {'fwd ms':>9} {'x static':>8} {'fwd+bwd ms':>11} {'x static':>8} "
              f"{'fwd MiB':>9} {'x static':>8} {'fwd+bwd MiB':>12} {'x static':>8}")
    lines = [header, "-" * len(header)]
    baseline = {r["size"]: r for r in rows if r["model"] == "static"}
    for r in rows:
        base = baseline[r["size"]]
        ratio = lambda key: r[key] / base[key] if base[key] else float("nan")  # noqa: E731
        lines.append(f"{r['size']:>5} {r['model']:<11} {1e3 * r['forward_s']:>9.1f} {ratio('forward_s'):>8.2f} "
                     f"{1e3 * r['train_s']:>11.1f} {ratio('train_s'):>8.2f} "
                     f"{r['forward_bytes'] / 2**20:>9.1f} {ratio('forward_bytes'):>8.2f} "
                     f"{r['train_bytes'] / 2**20:>12.1f} {ratio('train_bytes'):>8.2f}")
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
    parser.add_argument("--mini", action="store_true", help="quick CPU run: 112 px only and 2 repeats")
    parser.add_argument("--sizes", type=int, nargs="+", help="image sizes (default 112 224; --mini: 112)")
    parser.add_argument("--repeats", type=int, help="timed calls per measurement (default 10; --mini: 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--kernels", type=int, default=4, help="DY-Conv kernels K")
    parser.add_argument("--dynamic-ratio", type=float, default=0.3)
    parser.add_argument("--param-archs", nargs="+", default=["resnet18", "resnet50"], choices=ARCHS,
                        help="archs of the stored-parameter table")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([112] if args.mini else [112, 224])
    args.repeats = args.repeats or (2 if args.mini else 10)
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
    pad.keep_freed_memory()
    try:
        args = parse_args(argv)
    except ValueError as err:
        print(f"bench_dyconv: error: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"ResNet-18, batch {args.batch_size}, {args.repeats} repeats, device {args.device} ({name}), "
          f"K={args.kernels}, PAD dynamic ratio {args.dynamic_ratio}")
    print("time: mean per call; memory: peak bytes allocated by torch above those live before the pass "
          + ("(torch.cuda.max_memory_allocated)" if device.type == "cuda"
             else "(torch.profiler, at operator boundaries)"))
    print(format_timing(measure(args.sizes, args.batch_size, args.repeats, args.dynamic_ratio, args.kernels, device)))
    print()
    print(format_parameters(parameter_rows(args.param_archs, args.dynamic_ratio, args.kernels), args.dynamic_ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
