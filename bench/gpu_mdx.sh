#!/usr/bin/env bash
# MDX-Net on a GPU machine, one script (issue 13 item 7): run from the repository root in an
# environment built by `builder/install.sh gpu dev` (onnxruntime-gpu 1.31.1, CUDA 12.8).
#   bash bench/gpu_mdx.sh            # ~10 min on one H200-class GPU
# Prints: whether ONNX Runtime's CUDA provider activates (the worker's start check), per-chunk
# seconds at batch 1/2/4/8 on CUDA, our whole job at 180 s and 1800 s with peak RSS, and
# audio-separator on the same 180 s file (it picks CUDA itself when torch sees a GPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-python}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$py" - <<'PY'
from handler.core.models.mdx_net import ort_cuda_problem
problem = ort_cuda_problem()
print("ONNX Runtime CUDA provider:", "active" if problem is None else problem)
raise SystemExit(1 if problem else 0)
PY
export BATCH_SIZE="${BATCH_SIZE:-4}"
BENCH_DIR="${BENCH_DIR:-/tmp/mdx-bench-gpu}" "$py" bench/mdx.py --device cuda \
  --batches 1 2 4 8 --durations 180 1800 --no-theirs-long
