#!/usr/bin/env bash
# Build the diffq wheel (mdx_q / mdx_extra_q need it; PyPI has only its source, a Cython
# extension) into OUT_DIR, in a throwaway virtual environment with pinned build tools:
#   bash builder/build_diffq.sh OUT_DIR
# Needs a C compiler and Python's headers (the images run it in a builder stage, so neither
# reaches the final image; CI's replay runs it the same way). The wheel needs only numpy and
# torch at run time: install it with --no-deps (its declared Cython dependency is build-time).
set -euo pipefail
out="${1:?usage: build_diffq.sh OUT_DIR}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIFFQ_VERSION="0.2.4"
PY="${PYTHON:-python3}"
work="$(mktemp -d /tmp/diffq-build.XXXXXX)"
trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --no-cache-dir -r "$here/build-requirements.txt"
mkdir -p "$out"
"${pip[@]}" wheel --no-cache-dir --no-deps --no-build-isolation -w "$out" "diffq==${DIFFQ_VERSION}"
ls "$out"/diffq-"${DIFFQ_VERSION}"-*.whl
