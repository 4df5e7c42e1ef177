#!/usr/bin/env bash
# README command 2: the test-suite (sets up .venv first if needed). Extra args go to pytest.
#   scripts/test.sh           everything CI runs: real servers, real models, the soaks
#   scripts/test.sh --fast    the pure unit tier (no servers, no model runs): under a minute
# The suite runs in TEST_WORKERS processes (default 2, one file per worker at a time: module
# fixtures stay shared within a file), then the soaks alone in one process: their RSS-growth
# bounds were set on a process with the machine to itself. TEST_WORKERS=0: all in one process.
source "$(dirname "$0")/env.sh"
if [ "${1:-}" = "--fast" ]; then
  shift
  exec python -m pytest -q -m unit "$@"
fi
workers="${TEST_WORKERS:-2}"
if [ "$workers" = 0 ]; then
  exec python -m pytest -q "$@"
fi
if [ "$#" -gt 0 ]; then  # a selection: run it as given
  exec python -m pytest -q -n "$workers" --dist loadfile "$@"
fi
python -m pytest -q -n "$workers" --dist loadfile -m "not soak"
# Heavy work beside the suite (CI's build replay) holds HEAVY_LOCK; the soaks wait for it.
exec flock "${HEAVY_LOCK:-/tmp/demucs-worker-heavy.lock}" python -m pytest -q -m soak
