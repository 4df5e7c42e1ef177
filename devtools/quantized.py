"""Small quantized demucs models, saved the way demucs saves ``mdx_q`` / ``mdx_extra_q``.

demucs trains those with a ``diffq`` quantizer and releases ``serialize_model(model, args,
quantizer)``: the ``state`` is ``quantizer.get_quantized_state()`` (bit-packed integer levels
by diffq's compiled ``bitpack``, plus float16 and float leftovers) marked ``__quantized``, and
``demucs.states.set_state`` rebuilds the weights with ``diffq.restore_quantized_state``. The
real bags mix hybrid (``HDemucs``) and waveform (``Demucs``) networks; so does this one.
Random weights, as everywhere in the tests; ``min_size=0`` so every parameter is quantized.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from devtools.checkpoints import SOURCES4, write_bag

# The release bags weight their four networks per source; two networks here, same idea.
WEIGHTS = [[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0]]
BITS = 8


def small_hdemucs(seed: int) -> torch.nn.Module:
    from demucs.hdemucs import HDemucs

    torch.manual_seed(seed)
    return HDemucs(sources=SOURCES4, audio_channels=2, channels=4, samplerate=44100,
                   segment=4).eval()


def small_demucs(seed: int) -> torch.nn.Module:
    from demucs.demucs import Demucs

    torch.manual_seed(seed)
    return Demucs(sources=SOURCES4, audio_channels=2, channels=8, depth=3, samplerate=44100,
                  segment=4).eval()


def quantizer_for(model: torch.nn.Module):
    """The quantizer demucs builds for ``quant.qat`` training (``states.get_quantizer``)."""
    from demucs.states import get_quantizer

    return get_quantizer(model, SimpleNamespace(diffq=0, qat=BITS, min_size=0, group_size=8))


def save_quantized(model: torch.nn.Module, repo: Path, sig: str) -> Path:
    """``<sig>-<sha256[:8]>.th`` holding what ``serialize_model(model, args, quantizer)``
    returns (built here: serialize_model needs omegaconf for the training args only)."""
    from demucs.states import get_state, save_with_checksum

    args, kwargs = model._init_args_kwargs
    package = {"klass": model.__class__, "args": args, "kwargs": kwargs,
               "state": get_state(model, quantizer_for(model)), "training_args": {}}
    assert package["state"]["__quantized"]
    repo.mkdir(parents=True, exist_ok=True)
    save_with_checksum(package, repo / f"{sig}.th")
    return next(repo.glob(f"{sig}-*.th"))


def write_quantized_bag(repo: Path, name: str = "mdx_q", seed: int = 0) -> list[torch.nn.Module]:
    """A bag ``name`` of two quantized networks; returns the float networks it was made from."""
    nets = [small_hdemucs(seed), small_demucs(seed + 1)]
    sigs = [f"{seed:04x}9a9a", f"{seed:04x}9b9b"]
    for net, sig in zip(nets, sigs, strict=True):
        save_quantized(net, repo, sig)
    write_bag(repo, name, sigs, weights=WEIGHTS)
    return nets
