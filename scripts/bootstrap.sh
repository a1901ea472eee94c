#!/usr/bin/env bash
# Create .venv (if missing) and install tumorseg with the tested versions in constraints.txt.
# Usage: scripts/bootstrap.sh [dev]   ("dev" adds pytest, ruff, mypy and the itk extra the format tests need)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
extra=""
[[ "${1:-}" == "dev" ]] && extra="[dev,itk]"
stamp=".venv/.tumorseg-installed${extra}"
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
if [[ ! -f "$stamp" || constraints.txt -nt "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch first and pinned: an unpinned torch pulls the newest CUDA build (several GB).
    .venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
    .venv/bin/python -m pip install -q -c constraints.txt -e ".${extra}"
    touch "$stamp"
fi
