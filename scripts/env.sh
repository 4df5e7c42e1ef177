# Sourced by the scripts: make .venv (Python 3.11+) and install the pinned dependencies once;
# reinstall when builder/ requirement files change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.installed-$(cat builder/install.sh builder/requirements*.txt builder/constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing dependencies into .venv (a few minutes, once)..." >&2
  bash builder/install.sh cpu dev
  touch "$stamp"
fi
# The package itself, editable (its dependencies are the ones above): puts the
# `demucs-separate` command into .venv/bin.
if [ ! -x .venv/bin/demucs-separate ]; then
  python -m pip install --disable-pip-version-check -q --no-deps -e . \
    || echo "warning: pip install -e . failed; use python -m handler.adapters.cli instead" >&2
fi
# s3rver (npm, pinned by devtools/s3rver/package-lock.json): an S3 server that, unlike moto,
# refuses expired presigned URLs (tests/test_bad_input.py). Without node/npm that case skips.
if [ ! -f devtools/s3rver/node_modules/s3rver/bin/s3rver.js ] && command -v npm >/dev/null 2>&1; then
  npm ci --prefix devtools/s3rver --no-audit --no-fund --loglevel=error >&2 \
    || echo "warning: npm ci in devtools/s3rver failed; the expired-URL test will skip" >&2
fi
