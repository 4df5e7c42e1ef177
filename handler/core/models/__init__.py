"""Model registry: load a model by name once per process and reuse it across jobs."""

from __future__ import annotations

import logging
import threading
import time

import torch

from handler import config
from handler.config import device_name, torch_threads
from handler.core.models.base import INSTRUMENTAL, PRECISIONS, VOCALS, LoadedModel, Member
from handler.core.models.demucs_family import DEMUCS_MODELS
from handler.core.models.ensemble import presets
from handler.core.models.mdx_net import MDX_MODELS, onnx_path
from handler.errors import InvalidInput

__all__ = ["INSTRUMENTAL", "VOCALS", "LoadedModel", "Member", "KNOWN_MODELS", "get_model"]

log = logging.getLogger(__name__)

SPLEETER_MODELS = ("spleeter_2stems",)
PRESET_MODELS = tuple(presets())
# Named models; any MODELS_DIR/<name>.onnx (MDX-Net) is usable by its name too.
KNOWN_MODELS = SPLEETER_MODELS + DEMUCS_MODELS + MDX_MODELS + PRESET_MODELS

_cache: dict[str, LoadedModel] = {}
_lock = threading.Lock()
_threads_set = False


def pick_device() -> torch.device:
    name = device_name()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _configure_torch() -> None:
    global _threads_set
    if not _threads_set:
        # Size intra-op threads to the container's CPU quota, not the host's core count.
        torch.set_num_threads(torch_threads())
        # nn.MultiheadAttention's "fast path" computes self-attention with explicit score
        # matrices (bmm + softmax) on the CPU; off, it goes through scaled_dot_product_attention
        # (fused, flash-style). Same maths to ~1e-6; HTDemucs's transformer runs much faster.
        # A process-wide switch, so it is set once, here, before any model runs.
        torch.backends.mha.set_fastpath_enabled(False)
        _threads_set = True


def get_model(name: str) -> LoadedModel:
    """The named model, loaded on first use and cached for the life of the process.

    Besides the built-in names, any ``MODELS_DIR/<name>.ckpt`` + ``<name>.yaml`` pair (an MSST
    checkpoint: BS/Mel-Band RoFormer, MDX23C) and any ``MODELS_DIR/<name>.onnx`` (UVR MDX-Net)
    is a model by that name."""
    from handler.core.models import msst

    is_msst = name not in KNOWN_MODELS and msst.is_msst_name(name)
    if name not in KNOWN_MODELS and not is_msst and onnx_path(name) is None:
        known = ", ".join(KNOWN_MODELS + tuple(msst.available()))
        raise InvalidInput(f"unknown model {name!r}; known models: {known}"
                           " (or an MDX-Net model: MODELS_DIR/<name>.onnx)")
    with _lock:
        if name in _cache:
            return _cache[name]
        precision = config.precision()
        if precision not in PRECISIONS:
            raise InvalidInput(f"PRECISION={precision!r}; expected one of {', '.join(PRECISIONS)}")
        _configure_torch()
        device = pick_device()
        started = time.perf_counter()
        if is_msst:
            model = msst.load_msst(name, device)
        elif name in SPLEETER_MODELS:
            from handler.core.models.spleeter import load_spleeter

            model = load_spleeter(device)
        elif name in DEMUCS_MODELS:
            from handler.core.models.demucs_family import load_demucs

            model = load_demucs(name, device)
        elif name in PRESET_MODELS:
            from handler.core.models.ensemble import load_preset

            model = load_preset(name, device)
        else:
            from handler.core.models.mdx_net import load_mdx

            model = load_mdx(name, device)
        model.precision = precision
        log.info("loaded model %s on %s (%s) in %.2f s", name, device, model.precision,
                 time.perf_counter() - started)
        _cache[name] = model
        return model


def loaded_models() -> list[str]:
    return list(_cache)


def unload_all() -> None:
    with _lock:
        _cache.clear()
