#!/usr/bin/env bash
# README command 2: the test-suite (sets up .venv first if needed). Extra args go to pytest.
#   scripts/test.sh           everything CI runs: real servers, real models, the soak
#   scripts/test.sh --fast    the pure unit tier (no servers, no model runs): under a minute
source "$(dirname "$0")/env.sh"
if [ "${1:-}" = "--fast" ]; then
  shift
  exec python -m pytest -q -m unit "$@"
fi
exec python -m pytest -q "$@"
