"""Figures from the runs of the table and ablation scripts (matplotlib, PNG).

    python scripts/figures.py [--runs runs] [--scale mini] [--seeds 3] [--output results/figures]
        [--figures ratio lambdas per_layer comparisons]

Reads ``RUNS/<script>-<scale>/<row>/seed<k>`` (what ``scripts/lib.sh`` writes) and writes:

* ``accuracy_vs_dynamic_ratio.png`` (``ratio``): top-1 of PAD-DY-Conv and the RTE accuracy of PAD-MoE
  against the achieved dynamic ratio, mean ± std over seeds (scripts/ablation_dynamic_ratio.sh), with
  the fully dynamic and static (dense) rows of table1 (table2) as dashed lines ± std where they have run;
* ``scale_factors_over_training.png`` (``lambdas``): lambda_d and lambda_s (mean over PAD layers, then
  over seeds) over training for each scale-factor variant (scripts/ablation_scale_factors.sh), from
  the TensorBoard events (dyconv: ``pad/lambda_d_mean`` per epoch; MoE: ``train/lambda_d`` per
  logging step);
* ``per_layer_dynamic_ratio.png`` (``per_layer``): the dynamic ratio IMP left in each layer of the
  PAD rows of scripts/table1_imagenet_dyconv.sh and scripts/table2_glue_moe.sh, mean ± std over seeds
  (dyconv: ``summary.json``'s ``partition.per_layer``; MoE: ``partition.json``'s ``per_layer``);
* ``paired_differences.png`` (``comparisons``): every headline comparison of the paper (PAD vs fully
  dynamic, fully dynamic vs static/dense, on each table) as the paired difference over seeds with
  its 95% t-interval.

Missing runs are an error (one ``error:`` line, exit status 2).
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pad import records  # noqa: E402
from pad.runtime import (OneLineParser, UsageError, WriteError, atomic_write, error_line, read_json,  # noqa: E402
                         report_error)

FIGURES = {"ratio": "accuracy_vs_dynamic_ratio.png", "lambdas": "scale_factors_over_training.png",
           "per_layer": "per_layer_dynamic_ratio.png", "comparisons": "paired_differences.png",
           "search": "protocol_search.png"}
SUITE_FIGURES = ("ratio", "lambdas", "per_layer", "comparisons")  # the table scripts' figures (the default)
# The protocol search's candidates (results/regime_selection.md): ResNet-10 widths and training lengths.
SEARCH_WIDTHS, SEARCH_EPOCHS = (4, 8, 16), (2, 8)
# Published gains of DY-Conv (or ODConv / KernelWarehouse's DY-Conv baseline) over the static model, top-1 points:
# (model and data, lowest, highest). ImageNet: the DY-Conv, ODConv and KernelWarehouse papers; the small data sets:
# public reproductions.
PUBLISHED_GAINS = [("ResNet-50, ImageNet", 1.6, 2.3), ("ResNet-18, ImageNet", 2.3, 5.6), ("ResNet-10, ImageNet", 4.2, 4.2),
                   ("MobileNetV2 x0.5, ImageNet", 3.8, 5.9), ("ResNet-18, CIFAR-10", 0.1, 0.1),
                   ("MobileNetV2 x0.35, Tiny-ImageNet", -2.1, -2.1), ("ResNet-10 x0.25, Tiny-ImageNet", 1.9, 1.9)]
SCALE_VARIANTS = ("both", "s", "d", "none")


def script_dir(runs: Path, script: str, scale: str) -> Path:
    path = runs / f"{script}-{scale}"
    if not path.is_dir():
        raise UsageError(f"{path}: no runs of scripts/{script}.sh at {scale} scale (see --runs, --scale)")
    return path


def rows_matching(folder: Path, prefix: str) -> list[Path]:
    """Row folders of ``folder`` whose names start with ``prefix``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(prefix))


# ---------------------------------------------------------------- data

def ratio_curve(rows: list[records.Row], ratios: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ratios, mean score, std of the score)`` sorted by ratio; std 0 for one seed."""
    order = np.argsort(ratios)
    means = np.array([records.mean_std(rows[i].score)[0] for i in order])
    stds = np.array([records.mean_std(rows[i].score)[1] or 0.0 for i in order])
    return np.asarray(ratios)[order], means, stds


def achieved_ratio(row_dir: Path, seeds: int) -> float:
    """The mean achieved dynamic ratio of a row's seeds (summary.json / all_results.json)."""
    records.load_row(row_dir, seeds)  # every seed finished
    values = []
    for _, run in records.seed_dirs(row_dir, seeds):
        _, results = records.read_results(run)
        if results.get("dynamic_ratio") is None:
            raise UsageError(f"{run}: no dynamic_ratio in the results")
        values.append(float(results["dynamic_ratio"]))
    return float(np.mean(values))


def event_scalars(run: Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of a scalar ``tag`` in the TensorBoard events under ``run`` (any depth)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    folders = sorted({p.parent for p in run.rglob("events.out.tfevents*")})
    steps, values = [], []
    for folder in folders:
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                steps.append(event.step)
                values.append(event.value)
    if not steps:
        raise UsageError(f"{run}: no TensorBoard scalar {tag!r}")
    order = np.argsort(steps, kind="stable")
    return np.asarray(steps)[order], np.asarray(values)[order]


def seed_mean_curve(row_dir: Path, seeds: int, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """The mean over seeds of a scalar's curve, on the steps every seed logged."""
    curves = [event_scalars(run, tag) for _, run in records.seed_dirs(row_dir, seeds)]
    common = sorted(set.intersection(*(set(steps.tolist()) for steps, _ in curves)))
    if not common:
        raise UsageError(f"{row_dir}: the seeds logged {tag!r} at no common step")
    stacked = [[dict(zip(s.tolist(), v.tolist()))[step] for step in common] for s, v in curves]
    return np.asarray(common), np.mean(stacked, axis=0)


def per_layer_ratios(row_dir: Path, seeds: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(layer names, mean ratio, std)`` of the per-layer dynamic ratios IMP chose, over seeds."""
    records.load_row(row_dir, seeds)  # every seed finished
    layers = None
    table = []
    for _, run in records.seed_dirs(row_dir, seeds):
        kind, results = records.read_results(run)
        if kind == "dyconv":
            partition = results.get("partition")
            source = run / "summary.json"
        else:
            source = run / "partition.json"
            try:
                partition = read_json(source)
            except ValueError as err:
                raise UsageError(error_line(err)) from None
        if not isinstance(partition, dict) or not partition.get("per_layer"):
            raise UsageError(f"{source}: no partition per_layer ratios (is it a PAD run?)")
        if layers is None:
            layers = list(partition["per_layer"])
        elif list(partition["per_layer"]) != layers:
            raise UsageError(f"{source}: other layers than the row's first seed")
        table.append([partition["per_layer"][name] for name in layers])
    array = np.asarray(table, dtype=float)
    return layers, array.mean(0), array.std(0, ddof=1) if len(array) > 1 else np.zeros(len(layers))


# ---------------------------------------------------------------- figures

def pipeline_panels(folder: Path, pipelines: tuple, figure_width: float):
    """``[(ax, *pipeline)]`` for the pipelines (``(row prefix, ...)`` tuples) that have rows in ``folder``,
    one panel each (a suite run with ``--pipeline`` has one pipeline's rows only); none is an error."""
    present = [p for p in pipelines if rows_matching(folder, p[0])]
    if not present:
        raise UsageError(f"{folder}: no rows of " + " or ".join(f"{p[0]}*" for p in pipelines))
    fig, axes = plt.subplots(1, len(present), figsize=(figure_width * len(present) / len(pipelines), 4),
                             squeeze=False)
    return fig, [(ax, *p) for ax, p in zip(axes[0], present)]


def ratio_references(runs: Path, scale: str, seeds: int, prefix: str, row_dirs: list[Path]) -> list[tuple]:
    """``[(label, mean, std)]`` of the rows a dynamic-ratio curve is read against: the fully dynamic and
    the static (dense) model of table1 (table2) at the same scale, for the arch (task) of the curve's
    rows. A reference that has not finished is left out with a note on stderr: the lines are context,
    the curve is the figure."""
    if prefix == "resnet":
        arch = row_dirs[0].name.split("-pad")[0]
        wanted = [("table1_imagenet_dyconv", f"{arch}-dyconv", "DY-Conv (fully dynamic)"),
                  ("table1_imagenet_dyconv", f"{arch}-static", "static")]
    else:
        wanted = [("table2_glue_moe", "rte-moe", "MoE (fully dynamic)"), ("table2_glue_moe", "rte-none", "dense")]
    references = []
    for script, row, label in wanted:
        try:
            mean, std = records.mean_std(records.load_row(runs / f"{script}-{scale}" / row, seeds).score)
        except UsageError as err:
            print(f"note: no {label} line in {FIGURES['ratio']}: {err}", file=sys.stderr)
            continue
        references.append((f"{label}, {script}", mean, std or 0.0))
    return references


def figure_ratio(runs: Path, scale: str, seeds: int, path: Path) -> None:
    folder = script_dir(runs, "ablation_dynamic_ratio", scale)
    fig, panels = pipeline_panels(folder, (("resnet", "PAD-DY-Conv, top-1 (%)"),
                                           ("rte-pad", "PAD-MoE, RTE accuracy (%)")), 10)
    for ax, prefix, label in panels:
        row_dirs = rows_matching(folder, prefix)
        rows = [records.load_row(d, seeds) for d in row_dirs]
        x, mean, std = ratio_curve(rows, [achieved_ratio(d, seeds) for d in row_dirs])
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=4, label="PAD at each ratio")
        for (name, ref_mean, ref_std), color in zip(ratio_references(runs, scale, seeds, prefix, row_dirs),
                                                    ("C1", "C2")):
            ax.axhline(ref_mean, color=color, ls="--", lw=1, label=name)
            ax.axhspan(ref_mean - ref_std, ref_mean + ref_std, color=color, alpha=0.12, lw=0)
        ax.set(xlabel="dynamic ratio (achieved)", ylabel=label, title=f"{label.split(',')[0]} ({scale}, n={seeds})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Accuracy against the dynamic ratio (mean ± std over seeds)")
    save(fig, path)


def figure_lambdas(runs: Path, scale: str, seeds: int, path: Path) -> None:
    folder = script_dir(runs, "ablation_scale_factors", scale)
    fig, panels = pipeline_panels(folder, (("resnet", "pad/lambda_{}_mean", "epoch", "PAD-DY-Conv"),
                                           ("rte-pad", "train/lambda_{}", "optimizer step", "PAD-MoE (RTE)")), 11)
    for ax, prefix, tag, xlabel, title in panels:
        for variant, color in zip(SCALE_VARIANTS, ("C0", "C1", "C2", "C3")):
            matches = [d for d in rows_matching(folder, prefix) if d.name.endswith(f"-scale-{variant}")]
            if len(matches) != 1:
                raise UsageError(f"{folder}: expected one {prefix}*-scale-{variant} row, found {len(matches)}")
            for which, style in (("d", "-"), ("s", "--")):
                steps, values = seed_mean_curve(matches[0], seeds, tag.format(which))
                ax.plot(steps, values, style, color=color, marker=".", label=f"{variant}: lambda_{which}")
        ax.set(xlabel=xlabel, ylabel="mean over PAD layers", title=f"{title} ({scale}, n={seeds})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Scale factors over training, per learned-factor variant")
    save(fig, path)


def figure_per_layer(runs: Path, scale: str, seeds: int, path: Path) -> None:
    sources = []
    folder = script_dir(runs, "table1_imagenet_dyconv", scale)
    sources += [(d, "PAD-DY-Conv") for d in rows_matching(folder, "") if d.name.endswith("-dyconv-pad0.3")]
    folder = script_dir(runs, "table2_glue_moe", scale)
    sources += [(d, "PAD-MoE") for d in rows_matching(folder, "") if d.name.endswith("-pad")]
    if not sources:
        raise UsageError("no PAD rows in table1_imagenet_dyconv / table2_glue_moe")
    fig, axes = plt.subplots(len(sources), 1, figsize=(12, 2.6 * len(sources)), squeeze=False)
    for ax, (row_dir, title) in zip(axes[:, 0], sources):
        layers, mean, std = per_layer_ratios(row_dir, seeds)
        ax.bar(range(len(layers)), mean, yerr=std, capsize=2)
        ax.set_xticks(range(len(layers)), [shorten(n) for n in layers], rotation=90, fontsize=6)
        ax.set(ylabel="dynamic ratio", ylim=(0, 1), title=f"{title}: {row_dir.name} ({scale}, n={seeds})")
    fig.suptitle("Per-layer dynamic ratio chosen by IMP (mean ± std over seeds)")
    save(fig, path)


def headline_comparisons(runs: Path, scale: str, seeds: int) -> list[tuple[str, records.Comparison]]:
    """``[(table, comparison)]``: the paper's comparisons, PAD vs fully dynamic and fully dynamic vs
    static/dense, on every table (table_dynamic_convs: also its PAD variants, e.g. PAD-ODConv whose static
    part the attentions scale, against the fully dynamic conv)."""
    comparisons = []
    folder = script_dir(runs, "table1_imagenet_dyconv", scale)
    for pad_dir in rows_matching(folder, ""):
        if pad_dir.name.endswith("-dyconv-pad0.3"):
            arch = pad_dir.name[: -len("-dyconv-pad0.3")]
            pad, dyn, static = (records.load_row(folder / f"{arch}-{v}", seeds)
                                for v in ("dyconv-pad0.3", "dyconv", "static"))
            comparisons += [("table 1", records.compare(pad, dyn)), ("table 1", records.compare(dyn, static))]
    folder = script_dir(runs, "table_dynamic_convs", scale)
    for pad_dir in rows_matching(folder, ""):  # <arch>-<conv>-pad0.3 and its variants <arch>-<conv>-pad0.3-<variant>
        if pad_dir.name.endswith("-pad0.3") or "-pad0.3-" in pad_dir.name:
            dynamic = folder / pad_dir.name.split("-pad0.3")[0]
            comparisons.append(("dynamic convs", records.compare(records.load_row(pad_dir, seeds),
                                                                   records.load_row(dynamic, seeds))))
    folder = script_dir(runs, "table2_glue_moe", scale)
    averages = {}
    for moe in ("none", "moe", "pad"):
        rows = [records.load_row(d, seeds) for d in rows_matching(folder, "") if d.name.endswith(f"-{moe}")]
        if not rows:
            raise UsageError(f"{folder}: no *-{moe} rows")
        averages[moe] = records.average_row(f"GLUE average {moe}", rows)
    comparisons += [("GLUE", records.compare(averages["pad"], averages["moe"])),
                    ("GLUE", records.compare(averages["moe"], averages["none"]))]
    return comparisons


def figure_comparisons(runs: Path, scale: str, seeds: int, path: Path) -> None:
    comparisons = headline_comparisons(runs, scale, seeds)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(comparisons) + 1.8))
    for y, (_, c) in enumerate(comparisons):
        mean = float(np.mean(c.differences))
        interval = c.interval
        if interval is not None:
            ax.plot(interval, [y, y], color="C0")
        ax.plot([mean], [y], "o", color="C0")
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(comparisons)), [f"{table}: {c.a} - {c.b}" for table, c in comparisons], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("paired difference (points of top-1 / GLUE score)")
    ax.set_title(f"The paper's comparisons: mean paired difference and 95% t-interval\n({scale} scale, {seeds} seeds)",
                 fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    save(fig, path)


def search_gains(runs: Path, scale: str, seeds: int) -> dict[int, list[tuple[int, records.Comparison]]]:
    """``{epochs: [(width, DY-Conv - static over the first ``seeds`` seeds), ...]}`` of the protocol search's
    candidates whose rows have finished (the others are named on stderr)."""
    folder = script_dir(runs, "regime_search", scale)
    gains = {}
    for epochs in SEARCH_EPOCHS:
        for width in SEARCH_WIDTHS:
            setting = f"resnet10-w{width}-e{epochs}"
            try:
                dynamic, static = (records.load_row(folder / f"{setting}-{conv}", seeds) for conv in ("dyconv", "static"))
            except UsageError as err:
                print(f"note: {setting} is not in {FIGURES['search']}: {err}", file=sys.stderr)
                continue
            gains.setdefault(epochs, []).append((width, records.compare(dynamic, static)))
    if not gains:
        raise UsageError(f"{folder}: no candidate of the protocol search has finished")
    return gains


def figure_search(runs: Path, scale: str, seeds: int, path: Path) -> None:
    """The search's DY-Conv - static gain against width and training length, beside the published gains."""
    gains = search_gains(runs, scale, seeds)
    fig, (ours, published) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.2]})
    for i, (epochs, points) in enumerate(sorted(gains.items())):
        widths = np.array([w for w, _ in points], dtype=float) * (1 + 0.04 * (i - 0.5))  # side by side
        means = [float(np.mean(c.differences)) for _, c in points]
        low = [m - c.interval[0] if c.interval else 0.0 for m, (_, c) in zip(means, points)]
        high = [c.interval[1] - m if c.interval else 0.0 for m, (_, c) in zip(means, points)]
        ours.errorbar(widths, means, yerr=[low, high], marker="o", capsize=3, label=f"{epochs} epochs")
    ours.axhline(0, color="grey", lw=1)
    ours.set_xscale("log", base=2)
    ours.set_xticks(SEARCH_WIDTHS, [str(w) for w in SEARCH_WIDTHS])
    ours.set(xlabel="ResNet-10 width (first-stage channels)", ylabel="DY-Conv - static (top-1 points)",
             title=f"Fashion-MNIST ({scale}, {seeds} seeds, 95% intervals)")
    ours.legend()
    names = [name for name, _, _ in PUBLISHED_GAINS]
    for y, (_, lowest, highest) in enumerate(PUBLISHED_GAINS):
        published.plot([lowest, highest], [y, y], color="C2", lw=4, solid_capstyle="butt")
        published.plot([lowest, highest], [y, y], "|", color="C2", markersize=10)
    published.axvline(0, color="grey", lw=1)
    published.set_yticks(range(len(names)), names, fontsize=8)
    published.invert_yaxis()
    published.set(xlabel="DY-Conv - static (top-1 points)", title="Published gains")
    fig.suptitle("Where dynamic convolution pays off: the protocol search beside published results")
    save(fig, path)


def shorten(name: str) -> str:
    for suffix in (".bank", ".experts", ".weight"):
        name = name.removesuffix(suffix)
    return name.replace("bert.encoder.layer.", "L").replace("intermediate.dense", "inter").replace("output.dense", "out")


def save(fig, path: Path) -> None:
    fig.tight_layout()
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120), parents=True)
    finally:
        plt.close(fig)


MAKERS = {"ratio": figure_ratio, "lambdas": figure_lambdas, "per_layer": figure_per_layer,
          "comparisons": figure_comparisons, "search": figure_search}


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder of <script>-<scale>/ run folders")
    parser.add_argument("--scale", default="mini", choices=("mini", "protocol", "full", "smoke"),
                        help="whose runs: <script>-<scale>/; a figure of a scale other than mini is named "
                             "<figure>-<scale>.png")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (seed0 .. seed<N-1>)")
    parser.add_argument("--output", type=Path, default=Path("results/figures"))
    parser.add_argument("--figures", nargs="+", choices=list(FIGURES), default=list(SUITE_FIGURES),
                        help=f"which figures to make (default: the table scripts', {', '.join(SUITE_FIGURES)}; "
                             f"search: the protocol search's, from scripts/regime_search.sh's runs)")
    try:
        args = parser.parse_args(argv)
        if args.seeds < 1:
            raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
        for name in args.figures:
            path = args.output / FIGURES[name]
            if args.scale != "mini":
                path = path.with_name(f"{path.stem}-{args.scale}{path.suffix}")
            MAKERS[name](args.runs, args.scale, args.seeds, path)
            print(f"wrote {path}")
    except (UsageError, WriteError) as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
