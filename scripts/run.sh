#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the embedded default: the speedrun, which trains
# a tokenizer, builds data, pretrains the brief's MoE (16 experts, 2 active), fine-tunes it,
# evaluates it and writes a report card to runs/speedrun/ (about 15 minutes on 2 CPU cores).
# `nanoseek chat` talks to the embedded SmolLM2-135M-Instruct instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec nanoseek speedrun "$@"
