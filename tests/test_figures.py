"""scripts/figures.py on synthetic run folders (the layout scripts/lib.sh writes, TensorBoard events
written here): the data behind each figure, the PNG files, and missing runs."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

import figures

REPO = Path(__file__).resolve().parents[1]

SEEDS = 2
LAYERS = ["layer1.0.conv1.bank", "layer1.0.conv2.bank", "layer2.0.conv1.bank"]
MOE_LAYERS = ["bert.encoder.layer.0.intermediate.dense.experts", "bert.encoder.layer.0.output.dense.experts"]


def dyconv_run(run: Path, top1: float, seed: int, ratio=None, per_layer=None) -> None:
    run.mkdir(parents=True)
    summary = {"top1": top1, "top5": 99.0, "dynamic_ratio": ratio, "seed": seed}
    if per_layer is not None:
        summary["partition"] = {"target": 0.3, "per_layer": dict(zip(LAYERS, per_layer))}
    (run / "summary.json").write_text(json.dumps(summary))


def glue_run(run: Path, accuracy: float, ratio=0.5, per_layer=None) -> None:
    run.mkdir(parents=True)
    (run / "all_results.json").write_text(json.dumps({"eval_accuracy": accuracy, "dynamic_ratio": ratio}))
    if per_layer is not None:
        (run / "partition.json").write_text(json.dumps({"target": 0.5, "per_layer": dict(zip(MOE_LAYERS, per_layer))}))


def scalars(folder: Path, series: dict[str, list[tuple[int, float]]]) -> None:
    writer = SummaryWriter(str(folder))
    for tag, points in series.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def lambda_d(variant: str, seed: int, step: int) -> float:
    return 1.0 + 0.01 * step * (seed + 1) + 0.1 * figures.SCALE_VARIANTS.index(variant)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    ratio = root / "ablation_dynamic_ratio-mini"
    for r in (0.1, 0.3, 0.5, 0.7, 1.0):
        for k in range(SEEDS):
            dyconv_run(ratio / f"resnet10-pad{r}" / f"seed{k}", 80 + 10 * r + k, k, ratio=r + 0.001 * k)
    for r in (0.3, 0.5, 0.7, 0.9):
        for k in range(SEEDS):
            glue_run(ratio / f"rte-pad{r}" / f"seed{k}", 0.6 + 0.1 * r + 0.01 * k, ratio=r)
    scale = root / "ablation_scale_factors-mini"
    for v in figures.SCALE_VARIANTS:
        for k in range(SEEDS):
            run = scale / f"resnet10-pad0.3-scale-{v}" / f"seed{k}"
            dyconv_run(run, 85.0 + k, k, ratio=0.3)
            scalars(run / "tb", {"pad/lambda_d_mean": [(e, lambda_d(v, k, e)) for e in (1, 2, 3)],
                                 "pad/lambda_s_mean": [(e, 2 - lambda_d(v, k, e)) for e in (1, 2, 3)]})
            run = scale / f"rte-pad-scale-{v}" / f"seed{k}"
            glue_run(run, 0.6)
            scalars(run / "runs" / "Nov24_host", {"train/lambda_d": [(s, lambda_d(v, k, s)) for s in (4, 8)],
                                                  "train/lambda_s": [(s, 2 - lambda_d(v, k, s)) for s in (4, 8)]})
    table1 = root / "table1_imagenet_dyconv-mini"
    for k in range(SEEDS):
        dyconv_run(table1 / "resnet10-static" / f"seed{k}", 90.0 + k, k)
        dyconv_run(table1 / "resnet10-dyconv" / f"seed{k}", 91.0 + 0.5 * k, k, ratio=None)
        dyconv_run(table1 / "resnet10-dyconv-pad0.3" / f"seed{k}", 91.5 + 2 * k, k, ratio=0.3,
                   per_layer=[0.2 + 0.1 * k, 0.3, 0.4 - 0.1 * k])
    convs = root / "table_dynamic_convs-mini"
    for conv in ("condconv", "dyconv", "odconv"):
        for k in range(SEEDS):
            dyconv_run(convs / f"resnet10-{conv}" / f"seed{k}", 90.0 + k, k)
            dyconv_run(convs / f"resnet10-{conv}-pad0.3" / f"seed{k}", 90.5 + 1.5 * k, k, ratio=0.3)
    for k in range(SEEDS):  # a PAD variant of one conv (the ODConv static attention)
        dyconv_run(convs / "resnet10-odconv-pad0.3-all" / f"seed{k}", 89.0 + k, k, ratio=0.3)
    table2 = root / "table2_glue_moe-mini"
    for task in ("sst2", "rte"):
        for k in range(SEEDS):
            glue_run(table2 / f"{task}-none" / f"seed{k}", 0.70 + 0.01 * k, ratio=0.0)
            glue_run(table2 / f"{task}-moe" / f"seed{k}", 0.66 + 0.02 * k, ratio=1.0)
            glue_run(table2 / f"{task}-pad" / f"seed{k}", 0.68, per_layer=[0.5 + 0.01 * k, 0.5 - 0.01 * k])
    return root


def test_ratio_curve_means_and_stds(runs):
    folder = runs / "ablation_dynamic_ratio-mini"
    rows = [figures.records.load_row(d, SEEDS) for d in figures.rows_matching(folder, "resnet")]
    ratios = [figures.achieved_ratio(d, SEEDS) for d in figures.rows_matching(folder, "resnet")]
    x, mean, std = figures.ratio_curve(rows, ratios)
    assert x == pytest.approx([r + 0.0005 for r in (0.1, 0.3, 0.5, 0.7, 1.0)])
    assert mean == pytest.approx([80 + 10 * r + 0.5 for r in (0.1, 0.3, 0.5, 0.7, 1.0)])
    assert std == pytest.approx([statistics.stdev([0, 1])] * 5)


def test_lambda_curves_from_tensorboard(runs):
    folder = runs / "ablation_scale_factors-mini"
    steps, values = figures.seed_mean_curve(folder / "rte-pad-scale-d", SEEDS, "train/lambda_d")
    assert steps.tolist() == [4, 8]
    assert values == pytest.approx([np.mean([lambda_d("d", k, s) for k in range(SEEDS)]) for s in (4, 8)])
    steps, values = figures.seed_mean_curve(folder / "resnet10-pad0.3-scale-s", SEEDS, "pad/lambda_s_mean")
    assert steps.tolist() == [1, 2, 3]
    assert values == pytest.approx([np.mean([2 - lambda_d("s", k, e) for k in range(SEEDS)]) for e in (1, 2, 3)])


def test_per_layer_ratios(runs):
    layers, mean, std = figures.per_layer_ratios(runs / "table1_imagenet_dyconv-mini" / "resnet10-dyconv-pad0.3", SEEDS)
    assert layers == LAYERS
    assert mean == pytest.approx([0.25, 0.3, 0.35])
    assert std == pytest.approx([statistics.stdev([0.2, 0.3]), 0.0, statistics.stdev([0.4, 0.3])])
    layers, mean, _ = figures.per_layer_ratios(runs / "table2_glue_moe-mini" / "rte-pad", SEEDS)
    assert layers == MOE_LAYERS and mean == pytest.approx([0.505, 0.495])


def test_headline_comparisons(runs):
    comparisons = figures.headline_comparisons(runs, "mini", SEEDS)
    names = [f"{table}: {c.a} - {c.b}" for table, c in comparisons]
    assert names == ["table 1: resnet10-dyconv-pad0.3 - resnet10-dyconv", "table 1: resnet10-dyconv - resnet10-static",
                     "dynamic convs: resnet10-condconv-pad0.3 - resnet10-condconv",
                     "dynamic convs: resnet10-dyconv-pad0.3 - resnet10-dyconv",
                     "dynamic convs: resnet10-odconv-pad0.3 - resnet10-odconv",
                     "dynamic convs: resnet10-odconv-pad0.3-all - resnet10-odconv",
                     "GLUE: GLUE average pad - GLUE average moe", "GLUE: GLUE average moe - GLUE average none"]
    assert comparisons[0][1].differences == pytest.approx([0.5, 2.0])
    assert comparisons[5][1].differences == pytest.approx([-1.0, -1.0])  # 89 + k - (90 + k)
    assert comparisons[-1][1].differences == pytest.approx([-4.0, -3.0])  # (66 - 70), (68 - 71) on both tasks


def test_cli_writes_every_figure(runs, tmp_path):
    out = tmp_path / "figures"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "figures.py"), "--runs", str(runs),
                             "--seeds", str(SEEDS), "--output", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(figures.FIGURES[f] for f in figures.SUITE_FIGURES)
    for name in (figures.FIGURES[f] for f in figures.SUITE_FIGURES):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "figures.py"), "--runs", str(runs),
                             "--seeds", str(SEEDS), "--output", str(tmp_path / "one"), "--figures", "per_layer"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["per_layer_dynamic_ratio.png"]


@pytest.mark.parametrize("args, message", [
    (["--scale", "full"], "error: {runs}/ablation_dynamic_ratio-full: no runs of scripts/ablation_dynamic_ratio.sh "
                          "at full scale (see --runs, --scale)"),
    (["--seeds", "3", "--figures", "per_layer"],
     "error: row resnet10-dyconv-pad0.3: 1 of 3 runs missing or unfinished: "
     "{runs}/table1_imagenet_dyconv-mini/resnet10-dyconv-pad0.3/seed2"),
    (["--seeds", "2", "--figures", "bogus"], None),
])
def test_missing_runs_are_one_error_line(runs, tmp_path, args, message):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "figures.py"), "--runs", str(runs),
                             "--output", str(tmp_path), *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
    if message is not None:
        assert result.stderr == message.format(runs=runs) + "\n"
    assert not list(tmp_path.glob("*.png"))


def test_one_pipeline_gets_one_panel(runs, tmp_path, monkeypatch):
    """A suite run with --pipeline dyconv has only image rows in the ablations: the ratio and lambda figures
    draw the image panel alone; a folder with neither pipeline's rows is one error line."""
    import shutil
    only_images = tmp_path / "runs"
    for script in ("ablation_dynamic_ratio-mini", "ablation_scale_factors-mini"):
        shutil.copytree(runs / script, only_images / script, ignore=shutil.ignore_patterns("rte-*"))
    real_subplots, grids = figures.plt.subplots, []
    monkeypatch.setattr(figures.plt, "subplots", lambda *a, **k: (grids.append(a[:2]), real_subplots(*a, **k))[1])
    for name, maker in (("ratio", figures.figure_ratio), ("lambdas", figures.figure_lambdas)):
        maker(only_images, "mini", SEEDS, tmp_path / f"{name}.png")
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.format == "PNG"
    assert grids == [(1, 1), (1, 1)]  # one panel each
    for row in (only_images / "ablation_dynamic_ratio-mini").iterdir():
        shutil.rmtree(row)
    with pytest.raises(figures.UsageError, match="no rows of resnet\\* or rte-pad\\*"):
        figures.figure_ratio(only_images, "mini", SEEDS, tmp_path / "none.png")


def test_a_scale_other_than_mini_names_its_figures(runs, tmp_path):
    """--scale protocol reads <script>-protocol/ and writes <figure>-protocol.png, beside the --mini figures."""
    import shutil
    protocol = tmp_path / "runs"
    for script in ("ablation_dynamic_ratio", "table1_imagenet_dyconv"):
        shutil.copytree(runs / f"{script}-mini", protocol / f"{script}-protocol", ignore=shutil.ignore_patterns("rte-*"))
    out = tmp_path / "figures"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "figures.py"), "--runs", str(protocol),
                             "--scale", "protocol", "--seeds", str(SEEDS), "--output", str(out), "--figures", "ratio"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in out.iterdir()] == ["accuracy_vs_dynamic_ratio-protocol.png"]
    assert result.stdout == f"wrote {out / 'accuracy_vs_dynamic_ratio-protocol.png'}\n"


def test_ratio_references_are_table_rows_of_the_same_arch_or_task(runs, capsys):
    folder = runs / "ablation_dynamic_ratio-mini"
    refs = figures.ratio_references(runs, "mini", SEEDS, "resnet", figures.rows_matching(folder, "resnet"))
    assert [r[0] for r in refs] == ["DY-Conv (fully dynamic), table1_imagenet_dyconv", "static, table1_imagenet_dyconv"]
    assert [r[1:] for r in refs] == [pytest.approx((91.25, statistics.stdev([91.0, 91.5]))),
                                     pytest.approx((90.5, statistics.stdev([90.0, 91.0])))]
    refs = figures.ratio_references(runs, "mini", SEEDS, "rte-pad", figures.rows_matching(folder, "rte-pad"))
    assert [r[0] for r in refs] == ["MoE (fully dynamic), table2_glue_moe", "dense, table2_glue_moe"]
    assert [r[1] for r in refs] == pytest.approx([67.0, 70.5])
    assert capsys.readouterr().err == ""


def test_unfinished_ratio_reference_is_left_out_with_a_note(runs, tmp_path, capsys):
    import shutil
    partial = tmp_path / "runs"
    for script in ("ablation_dynamic_ratio-mini", "table1_imagenet_dyconv-mini"):
        shutil.copytree(runs / script, partial / script)
    shutil.rmtree(partial / "table1_imagenet_dyconv-mini" / "resnet10-static" / "seed1")
    rows = figures.rows_matching(partial / "ablation_dynamic_ratio-mini", "resnet")
    refs = figures.ratio_references(partial, "mini", SEEDS, "resnet", rows)
    assert [r[0] for r in refs] == ["DY-Conv (fully dynamic), table1_imagenet_dyconv"]
    assert "note: no static line in accuracy_vs_dynamic_ratio.png: row resnet10-static: 1 of 2 runs" in capsys.readouterr().err
    figures.figure_ratio(partial, "mini", SEEDS, tmp_path / "ratio.png")  # no table2: the text panel has no lines
    assert "note: no MoE (fully dynamic) line" in capsys.readouterr().err
    assert (tmp_path / "ratio.png").stat().st_size > 0


def test_protocol_search_gains_and_figure(tmp_path, capsys):
    """The search's DY-Conv - static gain per finished candidate (paired by seed); unfinished candidates are named
    and left out; the figure is drawn from what finished."""
    root = tmp_path / "runs"
    folder = root / "regime_search-mini"
    for k in range(SEEDS):
        for width, gain in ((4, 1.0 + k), (8, -0.5)):
            dyconv_run(folder / f"resnet10-w{width}-e2-static" / f"seed{k}", 87.0 + k, k)
            dyconv_run(folder / f"resnet10-w{width}-e2-dyconv" / f"seed{k}", 87.0 + k + gain, k)
    dyconv_run(folder / "resnet10-w4-e8-static" / "seed0", 90.0, 0)  # unfinished candidate
    gains = figures.search_gains(root, "mini", SEEDS)
    assert list(gains) == [2] and [w for w, _ in gains[2]] == [4, 8]
    assert gains[2][0][1].differences == pytest.approx([1.0, 2.0])
    assert gains[2][1][1].differences == pytest.approx([-0.5, -0.5])
    assert "note: resnet10-w4-e8 is not in protocol_search.png" in capsys.readouterr().err
    assert figures.main(["--runs", str(root), "--seeds", str(SEEDS), "--figures", "search",
                         "--output", str(tmp_path / "figures")]) == 0
    with Image.open(tmp_path / "figures" / "protocol_search.png") as image:
        assert image.format == "PNG" and image.width > 300
    empty = tmp_path / "empty" / "regime_search-mini"
    empty.mkdir(parents=True)
    with pytest.raises(figures.UsageError, match="no candidate of the protocol search has finished"):
        figures.search_gains(empty.parent, "mini", SEEDS)
