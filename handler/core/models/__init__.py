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
from handler.errors import InvalidInput

__all__ = ["INSTRUMENTAL", "VOCALS", "LoadedModel", "Member", "KNOWN_MODELS", "get_model"]

log = logging.getLogger(__name__)

SPLEETER_MODELS = ("spleeter_2stems",)
KNOWN_MODELS = SPLEETER_MODELS + DEMUCS_MODELS

_cache: dict[str, LoadedModel] = {}
_lock = threading.Lock()
_threads_set = False


def pick_device() -> torch.device:
    name = device_name()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _configure_threads() -> None:
    global _threads_set
    if not _threads_set:
        # Size intra-op threads to the container's CPU quota, not the host's core count.
        torch.set_num_threads(torch_threads())
        _threads_set = True


def get_model(name: str) -> LoadedModel:
    """The named model, loaded on first use and cached for the life of the process."""
    if name not in KNOWN_MODELS:
        raise InvalidInput(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")
    with _lock:
        if name in _cache:
            return _cache[name]
        precision = config.precision()
        if precision not in PRECISIONS:
            raise InvalidInput(f"PRECISION={precision!r}; expected one of {', '.join(PRECISIONS)}")
        _configure_threads()
        device = pick_device()
        started = time.perf_counter()
        if name in SPLEETER_MODELS:
            from handler.core.models.spleeter import load_spleeter

            model = load_spleeter(device)
        else:
            from handler.core.models.demucs_family import load_demucs

            model = load_demucs(name, device)
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
