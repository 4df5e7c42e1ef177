"""Build small demucs model repositories with random weights, in demucs's own checkpoint format.

Real weights cannot be downloaded here. A randomly initialised network loaded through demucs's
own loading code exercises exactly the path real weights take; LayerScale parameters (``*.scale``,
initialised near 0) are woken to O(1) so the transformer and DConv branches really shape the
output and numeric errors cannot hide behind them.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import torch
import yaml

SOURCES4 = ["drums", "bass", "other", "vocals"]


def small_htdemucs(seed: int, sources: list[str] | None = None) -> torch.nn.Module:
    from demucs.htdemucs import HTDemucs

    torch.manual_seed(seed)
    model = HTDemucs(
        sources=sources or SOURCES4, audio_channels=2, channels=16, depth=4,
        t_layers=2, t_heads=4, segment=Fraction(39, 5), samplerate=44100,
    )
    wake_layer_scales(model, seed)
    return model.eval()


def wake_layer_scales(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".scale"):
                param.copy_(0.5 + torch.rand(param.shape, generator=gen))


def save_checkpoint(model: torch.nn.Module, repo: Path, sig: str) -> Path:
    """Write ``<sig>-<checksum>.th`` as demucs's ``save_with_checksum`` does for releases."""
    from demucs.states import get_state, save_with_checksum

    args, kwargs = model._init_args_kwargs
    package = {
        "klass": model.__class__, "args": args, "kwargs": kwargs,
        "state": get_state(model, None, half=False), "training_args": {},
    }
    repo.mkdir(parents=True, exist_ok=True)
    save_with_checksum(package, repo / f"{sig}.th")
    return next(repo.glob(f"{sig}-*.th"))


def write_bag(repo: Path, name: str, sigs: list[str], weights=None, segment=None) -> None:
    bag: dict = {"models": sigs}
    if weights is not None:
        bag["weights"] = weights
    if segment is not None:
        bag["segment"] = segment
    (repo / f"{name}.yaml").write_text(yaml.safe_dump(bag))


def make_repo(repo: Path) -> Path:
    """``htdemucs`` (one random network) and ``htdemucs_ft`` (a bag of two with per-source
    weights), in demucs's local-repo layout."""
    save_checkpoint(small_htdemucs(0), repo, "0000aaaa")
    write_bag(repo, "htdemucs", ["0000aaaa"])
    save_checkpoint(small_htdemucs(1), repo, "1111bbbb")
    write_bag(repo, "htdemucs_ft", ["0000aaaa", "1111bbbb"],
              weights=[[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 0.5]])
    return repo
