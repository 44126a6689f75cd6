"""The project as an installed package: `pip install .` and `pip install -e .` into a fresh virtual environment
(offline, no build isolation, dependencies taken from the environment running the tests), then used from a
directory outside the repository."""
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The installed copy, not the checkout that tests/conftest.py puts on PYTHONPATH for the other subprocesses.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

USE = """
import importlib.metadata, sys
import torch
import pad, dyconv, moe
from dyconv.models import build_model
from moe.modeling import MoELinear
for module in (pad, dyconv, moe):
    print(module.__name__, module.__file__)
torch.manual_seed(0)
bank = pad.PartiallyDynamicWeights(3, (4, 2, 3, 3))
folded, _ = bank(fold=True)
model = build_model("resnet10", conv="dyconv", pad=True, num_classes=3, small_input=True, resnet_width=8)
logits = model(torch.randn(2, 3, 16, 16))
layer = MoELinear(6, 5, num_experts=3, moe="pad")
print("shapes", tuple(folded.shape), tuple(logits.shape), tuple(layer(torch.randn(4, 6)).shape))
print("ratio", pad.dynamic_ratio(model))
print("commands", sorted(ep.name for ep in importlib.metadata.entry_points(group="console_scripts")
                         if ep.name.startswith("padnet-") and callable(ep.load())))
"""


def fresh_venv(path: Path) -> Path:
    """A virtual environment that sees the packages of the one running the tests (like --system-site-packages,
    which would see the base interpreter's instead): a .pth file adds those site directories after its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(purelib, "parent_environment.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in parents) + "\n")
    return python


def pip_install(python: Path, *args: str) -> None:
    result = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                             "--no-index", *args], capture_output=True, text=True, env=ENV, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]


def run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=180)


def test_pip_install_makes_the_packages_and_commands_usable_anywhere(tmp_path):
    source = tmp_path / "source"  # a copy: the in-tree build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("pad", "dyconv", "moe"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    python = fresh_venv(venv)
    pip_install(python, str(source))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    used = run([python, "-c", USE], elsewhere)
    assert used.returncode == 0, used.stderr[-3000:]
    lines = used.stdout.splitlines()
    for name, line in zip(("pad", "dyconv", "moe"), lines):
        assert line.startswith(f"{name} {venv}"), line  # the installed copy, not the checkout
    assert "shapes (3, 4, 2, 3, 3) (2, 3) (4, 5)" in lines and "ratio 1.0" in lines
    assert "commands ['padnet-dyconv', 'padnet-glue', 'padnet-prepare-glue']" in lines

    helped = run([venv / "bin" / "padnet-dyconv", "--help"], elsewhere)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: padnet-dyconv"), helped.stderr[-2000:]


def test_editable_install_runs_the_command_line_files_from_anywhere(tmp_path):
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, "-e", str(REPO))
    for script, usage in (("dyconv/main.py", "usage: main.py"), ("moe/run_glue.py", "usage: run_glue.py")):
        helped = run([python, REPO / script, "--help"], tmp_path)
        assert helped.returncode == 0 and helped.stdout.startswith(usage), helped.stderr[-2000:]
