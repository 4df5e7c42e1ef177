#!/usr/bin/env bash
# README command 2: the test-suite (sets up .venv first if needed). Extra args go to pytest.
source "$(dirname "$0")/env.sh"
python -m pytest -q "$@"
