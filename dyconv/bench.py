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
  with a random mask at ``--dynamic-ratio`` (``pad.partition.select_dynamic`` on random scores).

``--compile [BACKEND]`` (default backend ``inductor``) times every model, the static one included,
as ``torch.compile(model, backend=BACKEND, dynamic=True)`` (batch and image size symbolic; torch
2.14's inductor fails to compile DY-Conv's training step that way: results/measured/bench_dyconv-compile.txt)
or, with ``--static-shapes``, ``dynamic=False`` (a graph per input shape). Each model's first call of
each pass compiles it; those seconds (compile plus one run) are reported in a table of their own (or
"failed" with the backend's error, and that pass is not timed), with the graphs dynamo compiled and the
graph breaks it hit per model (from ``torch._dynamo.utils.counters``), and the graphs compiled during
the timed rounds (0 when no call recompiles). The PAD model is also called once uncompiled first (also
when it is not timed, or not in every pass), so that the scheme table lists the schemes its layers
choose (the same choice: a compiled layer runs the same cost model but records nothing). Memory on CPU
is not measured when compiled ("-"): the profiler accounting above sums allocations at aten operator
boundaries, and inductor's generated code allocates and reuses its buffers outside such operators, so
the sum would not be the peak; on CUDA it is measured as above.

``pad-dyconv`` is the dense training form (all kernels stored, mask applied and the static
part folded into the kernels in every forward pass); ``pad-folded`` is its inference form
(:func:`dyconv.inference.to_inference`: folded kernels, no mask), timed in inference only.
``pad-unit`` is PAD-DY-Conv with a random *output-unit* mask at the same ratio (whole filters
static: where the layer takes the unit path they run as one ordinary conv, only the dynamic filters
through the dynamic scheme) and ``unit-folded`` its inference form (static filters stored as one
static weight).

``--variants`` and ``--passes`` restrict what is timed (the static model is always timed: the ratios' base).

``--layers`` times the dynamic convs one by one instead of the models (:func:`layer_costs`): each layer
of PAD-DY-Conv (random element mask) on the input it gets inside the model, forward + backward in
training mode, under every scheme exact for it, under ``auto``, and the same layer of DY-Conv under
``auto``, each against an ordinary ``nn.Conv2d`` of the same shape on the same input. It shows which
layers hold a model's ratio back, and the floor of choosing per layer among the schemes (the sum over
layers of each layer's fastest scheme).

Usage: ``python -m dyconv.bench [--mini] [--archs resnet18 mobilenetv2_100] [--sizes 112 224]
[--variants dyconv pad-folded] [--passes train infer] [--compile [inductor|aot_eager|eager]] [--layers] ...``
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch._dynamo.utils import counters as dynamo_counters
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

import pad
from pad.partition import check_dynamic_ratio
from pad.runtime import OneLineParser, UsageError, error_line, keep_freed_memory, report_error
from .inference import to_inference
from .layers import conv_schemes, dynamic_convs, set_conv_scheme
from .models import ARCHS, build_model, set_random_mask
from .schemes import POLICIES, SCHEMES, applicable_schemes

# (name, conv, pad, partition granularity)
VARIANTS = (("static", "static", False, None), ("dyconv", "dyconv", False, None),
            ("pad-dyconv", "dyconv", True, "element"), ("pad-unit", "dyconv", True, "unit"))
INFERENCE_VARIANTS = {"pad-folded": "pad-dyconv", "unit-folded": "pad-unit"}  # inference form: of which model
PASSES = ("train", "infer", "infer1")
VARIANT_NAMES = tuple(name for variant in VARIANTS for name in
                      (variant[0], *(n for n, source in INFERENCE_VARIANTS.items() if source == variant[0])))
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
# every variant's forward is one code object to dynamo, compiled once per model and pass (mode, grad,
# batch 1 are guarded): more than torch's default limit of 8 graphs per code object
RECOMPILE_LIMIT = 64


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


@dataclass(frozen=True)
class ModelPass:
    """One pass of a model the benchmark times. ``prepare()`` puts the model in the state the pass starts from
    (its mode and, for a training step, no gradients yet: see :func:`peak_bytes`); calling the pass runs
    ``prepare()`` and then ``body()``, the pass itself."""
    prepare: Callable[[], None]
    body: Callable[[], None]

    def __call__(self) -> None:
        self.prepare()
        self.body()


def forward_pass(model: nn.Module, x: torch.Tensor, amp: bool = False) -> ModelPass:
    """Inference of ``x`` ``(B, C, H, W)``: eval mode, no autograd graph."""
    def body():
        with torch.no_grad(), _autocast(x.device, amp):
            model(x)
    return ModelPass(model.eval, body)


def training_pass(model: nn.Module, x: torch.Tensor, amp: bool = False) -> ModelPass:
    """Forward and backward of ``logits.sum()`` for ``x`` ``(B, C, H, W)`` in training mode; ``prepare()`` sets
    the mode and frees the previous gradients (as ``optimizer.zero_grad()`` does)."""
    def prepare():
        model.train()
        model.zero_grad(set_to_none=True)

    def body():
        with _autocast(x.device, amp):
            loss = model(x).float().sum()
        loss.backward()
    return ModelPass(prepare, body)


def seconds(run: Callable[[], None], device: torch.device) -> float:
    """Wall time of one call (CUDA synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleaved_seconds(runs: dict, repeats: int, device: torch.device) -> dict[object, list[float]]:
    """``{key: [seconds of each round]}``: ``repeats`` rounds, each calling every one of ``runs`` once in turn, so
    that changes of load hit every run alike."""
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            times[key].append(seconds(run, device))
    return times


def peak_bytes(run: ModelPass, device: torch.device) -> int:
    """Peak bytes allocated by torch during ``run()`` above those live after ``run.prepare()``: what switching
    the mode frees (a PAD layer's cached fold, dropped by ``train()``) or a training step's ``zero_grad`` frees
    (the previous gradients) would otherwise be subtracted from the pass's own allocations, so the peak of a pass
    that follows another model state would read low. A training pass's peak therefore includes its new
    gradients."""
    run.prepare()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # Every pass allocates, but under CPU load the profiler now and then records no allocation at all for
    # one (a static model's pass read 0 bytes); such a reading is taken again, at most three times.
    for _ in range(3):
        peak = _profiled_peak_bytes(run)
        if peak > 0:
            break
    return peak


def _profiled_peak_bytes(run: Callable[[], None]) -> int:
    """The peak of the bytes held by torch's CPU allocator during ``run()``, above those live before it,
    summed over the top-level operators ``torch.profiler`` records in order."""
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


def pass_runs(models: dict, x: torch.Tensor, amp: bool, passes: Sequence[str] = PASSES) -> dict:
    """``{(variant, pass): ModelPass}`` for every variant and each of ``passes`` (no training pass of an
    inference form); ``infer1`` infers the first image of ``x`` ``(B, 3, S, S)`` alone."""
    return {(name, label): make(model, inputs, amp) for name, model in models.items()
            for label, make, inputs in (("train", training_pass, x), ("infer", forward_pass, x),
                                        ("infer1", forward_pass, x[:1]))
            if label in passes and not (label == "train" and name in INFERENCE_VARIANTS)}


def compiled_warm_up(runs: dict, device: torch.device) -> dict[str, dict]:
    """Calls every pass of compiled models once, model by model: ``{variant: {"<pass>_compile_s": seconds
    of the first call (compile plus one run), "graphs": graphs dynamo compiled, "breaks": {reason: count},
    "failures": {pass: first line of the error}}}``. A pass whose compile fails (the backend raises) gets
    ``None`` seconds and its error under ``failures``: the benchmark reports it rather than stopping."""
    stats: dict[str, dict] = {}
    for (name, label), run in runs.items():
        if name not in stats:
            dynamo_counters.clear()
            stats[name] = {"failures": {}}
        try:
            stats[name][f"{label}_compile_s"] = seconds(run, device)
        except torch._dynamo.exc.BackendCompilerFailed as err:  # (inductor raises its subclass InductorError)
            stats[name][f"{label}_compile_s"] = None
            cause = getattr(err, "inner_exception", None) or err  # what the backend raised
            stats[name]["failures"][label] = f"{type(cause).__name__}: {error_line(cause)}"
        stats[name]["graphs"] = dynamo_counters["stats"]["unique_graphs"]
        stats[name]["breaks"] = {reason.strip().splitlines()[0]: count
                                 for reason, count in dynamo_counters["graph_break"].items()}
    return stats


@dataclass(frozen=True)
class BenchSettings:
    """How every model is built and timed (the flags of :func:`parse_args`)."""
    batch_size: int
    repeats: int
    dynamic_ratio: float
    kernels: int
    device: torch.device
    scheme: str = "auto"
    amp: bool = False
    compile_backend: str | None = None  # time torch.compile(model, backend=..., dynamic=dynamic_shapes)
    dynamic_shapes: bool = True
    variants: Sequence[str] | None = None  # timed besides static (None: all of build_variants)
    passes: Sequence[str] = PASSES


@dataclass
class SizeTimings:
    """What the timed rounds of one arch at one image size measured."""
    runs: dict[tuple[str, str], ModelPass]  # the passes timed, by (variant, pass)
    times: dict[tuple[str, str], list[float]]  # their seconds, one per round
    compile_stats: dict[str, dict] | None  # compiled_warm_up's, by variant; None when not compiled
    timed_graphs: int  # graphs dynamo compiled during the timed rounds


def measure(archs: Sequence[str], sizes: Sequence[int], settings: BenchSettings) -> tuple[list[dict], dict]:
    """One row per (arch, size, variant): median seconds and peak bytes of each of ``settings.passes``
    (``None`` for the others); compiled, each row also has ``<pass>_compile_s``, ``graphs``, ``breaks``
    (:func:`compiled_warm_up`) and ``timed_graphs`` (graphs compiled during the timed rounds of its arch and
    size). Returns ``(rows, schemes)`` with ``schemes[(arch, size)]`` the PAD models' :func:`scheme_rows` at that
    size."""
    rows, schemes = [], {}
    progress = tqdm(total=len(archs) * len(sizes), desc="bench", file=sys.stderr, leave=False)
    for arch in archs:
        models = build_variants(arch, settings.kernels, settings.dynamic_ratio, settings.scheme, settings.device)
        timed_models = timed_variants(models, settings)
        for size in sizes:
            x = torch.randn(settings.batch_size, 3, size, size, device=settings.device)
            timings = time_size(models, timed_models, x, settings)
            rows += [variant_row(arch, size, name, timings, settings) for name in timed_models]
            schemes[(arch, size)] = scheme_rows(models["pad-dyconv"], models["pad-unit"])
            progress.update()
        del models
    progress.close()
    return rows, schemes


def timed_variants(models: dict, settings: BenchSettings) -> dict:
    """``{variant: model}`` of the variants timed (``static`` always: the ratios' base), compiled where asked."""
    timed = {name: model for name, model in models.items()
             if settings.variants is None or name == "static" or name in settings.variants}
    if settings.compile_backend is None:
        return timed
    torch._dynamo.reset()
    return {name: torch.compile(model, backend=settings.compile_backend, dynamic=settings.dynamic_shapes)
            for name, model in timed.items()}


def time_size(models: dict, timed_models: dict, x: torch.Tensor, settings: BenchSettings) -> SizeTimings:
    """Times every pass of ``timed_models`` on ``x`` ``(B, 3, S, S)`` in interleaved rounds (load changes hit
    every model alike), after one warm-up call each; ``models`` (all variants, uncompiled) choose their
    schemes afresh for this size."""
    for model in models.values():  # only this size's choices recorded (made again alike: same rule)
        set_conv_scheme(model, settings.scheme)
    runs = pass_runs(timed_models, x, settings.amp, settings.passes)
    record_listed_schemes(models, runs, x, settings)
    runs, compile_stats = warm_up(runs, settings)
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        times = interleaved_seconds(runs, settings.repeats, settings.device)
    return SizeTimings(runs, times, compile_stats, dynamo_counters["stats"]["unique_graphs"])


def record_listed_schemes(models: dict, runs: dict, x: torch.Tensor, settings: BenchSettings) -> None:
    """Calls every pass of the PAD models the scheme table lists once, uncompiled, where the timed ``runs`` do not
    (compiled, or not all their passes timed): a compiled layer runs the same cost model but records nothing."""
    listed = {name: models[name] for name in ("pad-dyconv", "pad-unit")}
    if settings.compile_backend is not None or any((name, label) not in runs for name in listed for label in PASSES):
        for run in pass_runs(listed, x, settings.amp).values():
            run()


def warm_up(runs: dict, settings: BenchSettings) -> tuple[dict, dict[str, dict] | None]:
    """Calls every pass once before the timed rounds: eagerly for first-call allocations, kernel selection and
    scheme choice; compiled, to compile (:func:`compiled_warm_up`). Returns ``(the passes to time, compile
    stats or None)``: a pass whose compile failed is not timed."""
    if settings.compile_backend is None:
        for run in runs.values():
            run()
        return runs, None
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        compile_stats = compiled_warm_up(runs, settings.device)
    runs = {key: run for key, run in runs.items() if key[1] not in compile_stats[key[0]]["failures"]}
    dynamo_counters.clear()
    return runs, compile_stats


def variant_row(arch: str, size: int, name: str, timings: SizeTimings, settings: BenchSettings) -> dict:
    """The row of variant ``name``: median seconds of each pass, peak bytes of its training and inference
    passes (measured here; not when compiled on CPU, see the module docstring), compile statistics."""
    row = {"arch": arch, "size": size, "model": name}
    runs = timings.runs
    for label in PASSES:
        row[f"{label}_s"] = statistics.median(timings.times[(name, label)]) if (name, label) in runs else None
    measure_memory = settings.compile_backend is None or settings.device.type == "cuda"
    for label in ("train", "infer"):
        row[f"{label}_bytes"] = (peak_bytes(runs[(name, label)], settings.device)
                                 if (name, label) in runs and measure_memory else None)
    if timings.compile_stats is not None:
        untimed = {"graphs": 0, "breaks": {}, "failures": {}}  # a variant with no pass timed
        row.update({f"{label}_compile_s": None for label in PASSES}, **timings.compile_stats.get(name, untimed),
                   timed_graphs=timings.timed_graphs)
    return row


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


def layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Size]:
    """``{name: input shape}`` of every dynamic conv of ``model`` in a training-mode forward pass of ``x``."""
    shapes, hooks = {}, []

    def record(name: str):
        def hook(_, args) -> None:
            shapes.setdefault(name, args[0].shape)
        return hook

    for name, layer in dynamic_convs(model):
        hooks.append(layer.register_forward_pre_hook(record(name)))
    try:
        model.train()
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _layer_step(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).sum().backward()
    return run


def layer_costs(arch: str, size: int, settings: BenchSettings) -> list[dict]:
    """One row per dynamic conv of ``arch`` at ``size`` px: median seconds of its training step (forward +
    backward of ``out.sum()``, the input requiring grad) as an ordinary ``nn.Conv2d`` (``static_s``), as the
    PAD-DY-Conv layer under each exact scheme (``schemes: {scheme: s}``) and under ``auto``
    (``auto_s``, ``auto``: the scheme it chose), and as the DY-Conv layer under ``auto`` (``dyconv_s``);
    interleaved rounds (``settings.repeats``), on a random input of the shape the layer gets in the model at
    ``settings.batch_size``."""
    batch_size, repeats, device = settings.batch_size, settings.repeats, settings.device
    kernels, dynamic_ratio = settings.kernels, settings.dynamic_ratio
    torch.manual_seed(0)
    pad_model = build_model(arch, "dyconv", True, kernels=kernels).to(device)
    set_random_mask(pad_model, dynamic_ratio)
    dy_model = build_model(arch, "dyconv", False, kernels=kernels).to(device)
    shapes = layer_inputs(pad_model, torch.randn(batch_size, 3, size, size, device=device))
    dy_layers = dict(dynamic_convs(dy_model))
    rows = []
    for name, layer in dynamic_convs(pad_model):
        x = torch.randn(shapes[name], device=device, requires_grad=True)
        static = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                           layer.dilation, layer.groups, bias=False).to(device)
        forced = {}
        for scheme in applicable_schemes(layer.kernel_size, has_spatial=False):
            forced[scheme] = copy.deepcopy(layer)
            set_conv_scheme(forced[scheme], scheme)
        auto = copy.deepcopy(layer)
        set_conv_scheme(auto, "auto")
        runs = {"static": _layer_step(static, x), "auto": _layer_step(auto, x),
                "dyconv": _layer_step(dy_layers[name], x), **{s: _layer_step(m, x) for s, m in forced.items()}}
        for run in runs.values():
            run()  # warm-up; records auto's choice
        times = interleaved_seconds(runs, repeats, device)
        median = {key: statistics.median(values) for key, values in times.items()}
        rows.append({"arch": arch, "size": size, "name": name, "input": tuple(shapes[name][-2:]),
                     "shape": layer_shape(layer),
                     "static_s": median["static"], "auto_s": median["auto"], "dyconv_s": median["dyconv"],
                     "auto": next(iter(auto.chooser.schemes.values())),
                     "schemes": {s: median[s] for s in forced}})
    return rows


def format_layer_costs(rows: list[dict]) -> str:
    """Per layer: the static conv's ms, each scheme's and auto's ratio to it, DY-Conv's, and the layer's share
    of the summed static time; per (arch, size) the sums (a model's dynamic convs alone, nothing else)."""
    header = (f"{'layer':<28} {'shape':<18} {'in':>7} {'static ms':>9} {'share':>6} "
              + " ".join(f"{s:>8}" for s in SCHEMES) + f" {'auto':>8} {'chose':>8} {'dyconv':>8}")
    lines = ["training step (forward + backward) of each dynamic conv alone, ratio to an ordinary conv of its shape; "
             "PAD-DY-Conv (random element mask) under each scheme and auto, DY-Conv under auto; share: of the summed "
             "static time"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["arch"], row["size"]), []).append(row)
    for (arch, size), layer_rows in groups.items():
        static_total = sum(r["static_s"] for r in layer_rows)
        lines += [f"{arch} {size} px", header, "-" * len(header)]
        for r in layer_rows:
            cells = " ".join(f"{r['schemes'][s] / r['static_s']:>7.2f}x" if s in r["schemes"] else f"{'-':>8}"
                             for s in SCHEMES)
            lines.append(f"{r['name']:<28} {r['shape']:<18} {r['input'][0]:>3}x{r['input'][1]:<3} "
                         f"{1e3 * r['static_s']:>9.2f} {r['static_s'] / static_total:>6.1%} {cells} "
                         f"{r['auto_s'] / r['static_s']:>7.2f}x {r['auto']:>8} {r['dyconv_s'] / r['static_s']:>7.2f}x")
        auto, dyconv = sum(r["auto_s"] for r in layer_rows), sum(r["dyconv_s"] for r in layer_rows)
        best = sum(min(r["schemes"].values()) for r in layer_rows)
        lines.append(f"sum over the {len(layer_rows)} dynamic convs: static {1e3 * static_total:.1f} ms; PAD auto "
                     f"{auto / static_total:.2f}x, PAD with each layer's fastest scheme {best / static_total:.2f}x, "
                     f"DY-Conv auto {dyconv / static_total:.2f}x")
    return "\n".join(lines)


def format_timing(rows: list[dict]) -> str:
    header = (f"{'arch':<16} {'size':>5} {'model':<11} {'train ms':>9} {'x':>6} {'infer ms':>9} {'x':>6} "
              f"{'infer1 ms':>9} {'x':>6} {'train MiB':>10} {'x':>6} {'infer MiB':>10} {'x':>6}")
    lines = [header, "-" * len(header)]
    baseline = {(r["arch"], r["size"]): r for r in rows if r["model"] == "static"}
    for r in rows:
        base = baseline[(r["arch"], r["size"])]
        def cell(key: str, scale: float, width: int) -> str:
            if r[key] is None or base[key] is None:
                return f"{'-':>{width}} {'-':>6}"
            ratio = r[key] / base[key] if base[key] else float("nan")
            return f"{scale * r[key]:>{width}.1f} {ratio:>6.2f}"

        cells = [cell(f"{p}_s", 1e3, 9) for p in PASSES] + [cell(f"{p}_bytes", 2**-20, 10) for p in ("train", "infer")]
        lines.append(f"{r['arch']:<16} {r['size']:>5} {r['model']:<11} " + " ".join(cells))
    return "\n".join(lines)


def format_compile(rows: list[dict], backend: str, dynamic_shapes: bool = True) -> str:
    """Per compiled model: seconds of the first call of each pass, graphs compiled, graph breaks."""
    timed_graphs = sum({(r["arch"], r["size"]): r["timed_graphs"] for r in rows}.values())
    header = (f"{'arch':<16} {'size':>5} {'model':<11} {'train s':>8} {'infer s':>8} {'infer1 s':>8} "
              f"{'graphs':>6} {'breaks':>6}")
    lines = [f"torch.compile(model, backend={backend!r}, dynamic={dynamic_shapes}): seconds of each pass's first call "
             f"(compile plus one run), graphs compiled, graph breaks; graphs compiled during the timed rounds: "
             f"{timed_graphs}", header, "-" * len(header)]
    reasons: dict[str, int] = {}
    failures = []
    for r in rows:
        cells = [f"{r[f'{p}_compile_s']:>8.1f}" if r[f"{p}_compile_s"] is not None
                 else f"{'failed' if p in r['failures'] else '-':>8}" for p in PASSES]
        failures += [f"  compile failed, {r['model']} {p}: {error}" for p, error in r["failures"].items()]
        lines.append(f"{r['arch']:<16} {r['size']:>5} {r['model']:<11} {' '.join(cells)} {r['graphs']:>6} "
                     f"{sum(r['breaks'].values()):>6}")
        for reason, count in r["breaks"].items():
            reasons[f"{r['model']}: {reason}"] = reasons.get(f"{r['model']}: {reason}", 0) + count
    lines += [f"  graph break x{count}, {reason}" for reason, count in reasons.items()] + failures
    return "\n".join(lines)


def layer_shape(layer: nn.Module) -> str:
    """A dynamic conv's shape as the tables print it, e.g. ``"3x3 64->128 /2"`` or ``"3x3 96->96 dw"``."""
    return (f"{layer.kernel_size}x{layer.kernel_size} {layer.in_channels}->{layer.out_channels}"
            + (" dw" if layer.groups > 1 else "") + (f" /{layer.stride}" if layer.stride > 1 else ""))


def scheme_rows(model: nn.Module, unit_model: nn.Module) -> list[dict]:
    """Every dynamic conv of ``model``: name, shape, the schemes it chose and the paths the same layer of
    ``unit_model`` (a unit mask) took (:func:`conv_schemes`)."""
    recorded, unit = conv_schemes(model), conv_schemes(unit_model)
    return [{"name": name, "chosen": recorded[name]["chosen"], "paths": unit[name]["paths"],
             "shape": layer_shape(layer)}
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="bench_dyconv", description=__doc__.split("\n")[0])
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
                        help="call pad.runtime.keep_freed_memory() first (glibc keeps freed memory; default: the "
                             "allocator a user's own script gets)")
    parser.add_argument("--amp", action="store_true", help="autocast: bfloat16 on CPU, float16 on CUDA")
    parser.add_argument("--variants", nargs="+", choices=[name for name in VARIANT_NAMES if name != "static"],
                        help="variants timed besides static (default all: "
                             f"{' '.join(name for name in VARIANT_NAMES if name != 'static')})")
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES),
                        help="passes timed (default all: train infer infer1)")
    parser.add_argument("--compile", nargs="?", const="inductor", choices=COMPILE_BACKENDS, metavar="BACKEND",
                        help="time torch.compile(model, backend=BACKEND, dynamic=True) of every model "
                             f"(BACKEND one of {', '.join(COMPILE_BACKENDS)}; default inductor)")
    parser.add_argument("--param-archs", nargs="+", default=["resnet18", "resnet50"], choices=ARCHS,
                        help="archs of the stored-parameter table")
    parser.add_argument("--static-shapes", action="store_true",
                        help="with --compile: dynamic=False (a graph per input shape, no symbolic sizes)")
    parser.add_argument("--layers", action="store_true",
                        help="time each dynamic conv alone under every scheme instead of the models")
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
    check_dynamic_ratio(args.dynamic_ratio)
    if args.static_shapes and not args.compile:
        raise ValueError("--static-shapes needs --compile")
    if args.layers and (args.compile or args.amp or args.variants or args.scheme != "auto"
                        or args.passes != list(PASSES)):
        raise ValueError("--layers times every scheme of each layer's training step in float32, eagerly: it takes "
                         "none of --compile, --amp, --variants, --scheme, --passes")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except (UsageError, ValueError) as err:
        return report_error(err)
    allocator = "default allocator"
    if args.keep_freed_memory:
        allocator = "pad.runtime.keep_freed_memory()" if keep_freed_memory() else "keep_freed_memory unavailable"
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{' '.join(args.archs)}, batch {args.batch_size}, {args.repeats} repeats, device {args.device} ({name}), "
          f"K={args.kernels}, PAD dynamic ratio {args.dynamic_ratio}, scheme {args.scheme}, {allocator}"
          + (", amp" if args.amp else "")
          + (f", torch.compile backend {args.compile} dynamic={not args.static_shapes}" if args.compile else ""))
    settings = BenchSettings(args.batch_size, args.repeats, args.dynamic_ratio, args.kernels, device, args.scheme,
                             args.amp, args.compile, not args.static_shapes, args.variants, args.passes)
    if args.layers:
        print("time: median over interleaved rounds; x: ratio to an ordinary conv of the layer's shape on the same input")
        rows = [row for arch in args.archs for size in args.sizes for row in layer_costs(arch, size, settings)]
        print(format_layer_costs(rows))
        return 0
    print("time: median over interleaved rounds; x: ratio to the static model of the same arch and size; "
          "infer1: batch 1; memory: peak bytes allocated by torch above those live before the pass "
          + ("(torch.cuda.max_memory_allocated)" if device.type == "cuda"
             else "(not measured when compiled, see dyconv/bench.py)" if args.compile
             else "(torch.profiler, at operator boundaries)"))
    rows, schemes = measure(args.archs, args.sizes, settings)
    print(format_timing(rows))
    if args.compile:
        print()
        print(format_compile(rows, args.compile, not args.static_shapes))
    print()
    print(format_schemes(schemes))
    print()
    print(format_parameters(parameter_rows(args.param_archs, args.dynamic_ratio, args.kernels), args.dynamic_ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
