#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with the project and its
# pinned dependencies (constraints.txt). Python 3.11, no GPU needed.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]'
echo "set up: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)') in .venv"
