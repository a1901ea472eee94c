#!/usr/bin/env bash
# The test suite (what CI runs): installs into .venv with dev extras, then ruff, mypy and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh dev
export MLFLOW_DISABLE_TELEMETRY=true
.venv/bin/ruff check tumorseg tests benchmarks
.venv/bin/mypy tumorseg
exec .venv/bin/python -m pytest -q "$@"
