"""Numeric precision of a loaded model.

``PRECISION`` (env): ``fp32`` (default) | ``bf16`` | ``fp16``. bf16/fp16 autocast each forward
pass: worth it on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), where the issue measured
~1.85x per htdemucs chunk at ~33 dB from fp32; elsewhere PyTorch emulates bf16 and it is many
times slower. fp32 keeps the output equal to demucs's own to float rounding.

Measured and dropped: dynamic int8 quantization of the transformer's ``nn.Linear`` layers
(no gain on a whole job here, +120 MB RSS).
"""

from __future__ import annotations

import torch

from ..errors import InvalidInput
from .base import LoadedModel

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def apply_precision(model: LoadedModel, precision: str) -> LoadedModel:
    if precision not in _AUTOCAST:
        raise InvalidInput(f"PRECISION={precision!r}; expected one of {', '.join(_AUTOCAST)}")
    model.precision = precision
    model.autocast_dtype = _AUTOCAST[precision]
    return model
