#!/usr/bin/env bash
# The main job end to end on the built-in synthetic dataset: installs into .venv, then runs
# pipelines/demo.yaml (synth -> ingest -> train -> evaluate -> register/promote), tracked in ./mlflow.db.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
exec .venv/bin/tumorseg pipeline run pipelines/demo.yaml "$@"
