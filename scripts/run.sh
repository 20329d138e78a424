#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec nanoseek chat "$@"
