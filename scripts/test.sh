#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# the chat page's browser test must run in CI, not skip
export NANOSEEK_REQUIRE_BROWSER=1
# ... and so must the native decode loop's tests
export NANOSEEK_REQUIRE_NATIVE=1
exec python3 -m pytest -q "$@"
