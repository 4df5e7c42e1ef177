#!/usr/bin/env bash
# README command 2: the test-suite (sets up .venv first if needed). Extra args go to pytest.
#   scripts/test.sh           everything CI runs: real servers, real models, the soaks
#   scripts/test.sh --fast    the pure unit tier (no servers, no model runs): under a minute
# The full suite runs in TEST_WORKERS processes (default 2, one file per worker at a time:
# module fixtures stay shared within a file); TEST_WORKERS=0 runs it in this process.
source "$(dirname "$0")/env.sh"
if [ "${1:-}" = "--fast" ]; then
  shift
  exec python -m pytest -q -m unit "$@"
fi
workers="${TEST_WORKERS:-2}"
if [ "$workers" = 0 ]; then
  exec python -m pytest -q "$@"
fi
exec python -m pytest -q -n "$workers" --dist loadfile "$@"
