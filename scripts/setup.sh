#!/usr/bin/env bash
# One-time set-up on a fresh machine: Python deps (the CPU torch build), nanoseek itself, the
# system tools the test suite uses, and the embedded default model. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first and pinned: any unpinned requirement could otherwise pull a multi-GB CUDA build
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test]"
if [ "${1:-}" = "--test" ]; then
  # bubblewrap: the HumanEval sandbox; chromium: the chat page's browser test
  need=""
  command -v bwrap >/dev/null || need="$need bubblewrap"
  command -v chromium >/dev/null || need="$need chromium"
  command -v g++ >/dev/null || need="$need g++"  # the native decode loop (engine/native.py)
  if [ -n "$need" ]; then
    (apt-get update -qq && apt-get install -y -qq $need) >/dev/null 2>&1 || echo "warning: could not apt-get install$need" >&2
  fi
fi
nanoseek pull >/dev/null
# the native decode loop, built once now rather than on the first generation (needs a C++ compiler)
$PY -c "from nanoseek.engine import native; native.module()"
