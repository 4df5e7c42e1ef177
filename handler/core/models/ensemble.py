"""Presets: a model name that combines several networks per stem (``presets.json``, data).

Each preset member is a model (an MDX-Net ``.onnx`` in MODELS_DIR, or a demucs model) that
yields ``vocals`` and ``instrumental = mix - vocals`` (MDX: ``mix - compensate * primary``);
the engine averages members per stem with their weights (weighted waveform averaging), each
in its own lane with its own family's chunking, so the whole stays streaming and bounded.

Member options:
  weight            the member's weight (same for both stems)
  compensate        MDX only: overrides the model's compensate for its secondary stem
  invert_input      y(x) = -f(-x)  (MVSEP-MDX23 runs Kim_Inst on the inverted mix)
  average_inverted  y(x) = (f(x) - f(-x)) / 2  (MVSEP-MDX23's demucs pass; MDX "denoise")
  source            demucs only: the demucs source that is the vocals (default "vocals"); a
                    bag contributes only its networks that weigh that source
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from handler.core.models.base import INSTRUMENTAL, VOCALS, LoadedModel, Member
from handler.errors import InvalidInput, ModelUnavailable

PRESETS_FILE = Path(__file__).with_name("presets.json")
SOURCES = [VOCALS, INSTRUMENTAL]
_MEMBER_KEYS = {"model", "weight", "compensate", "invert_input", "average_inverted", "source"}

Forward = Callable[[torch.Tensor], torch.Tensor]


@cache
def presets() -> dict[str, dict]:
    data = json.loads(PRESETS_FILE.read_text())
    for name, preset in data.items():
        members = preset.get("members")
        if not members:
            raise ValueError(f"preset {name} has no members")
        for m in members:
            if set(m) - _MEMBER_KEYS or "model" not in m or float(m.get("weight", 1)) <= 0:
                raise ValueError(f"preset {name}: bad member {m}")
    return data


def _inverted(f: Forward) -> Forward:
    return lambda x: -f(-x)


def _averaged(f: Forward) -> Forward:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (f(x) - f(-x))
    return forward


def _vocals_and_rest(net: torch.nn.Module, index: int) -> Forward:
    """A demucs network as [vocals, mix - vocals] (the input and output are aligned)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        vocals = net(x)[:, index]
        return torch.stack([vocals, x - vocals], dim=1)
    return forward


def _demucs_members(spec: dict, device: torch.device) -> list[tuple[Member, float]]:
    from handler.core.models.demucs_family import DEMUCS_MODELS, load_demucs

    name = spec["model"]
    if name not in DEMUCS_MODELS:
        raise ModelUnavailable(f"preset member {name!r} is neither an MDX-Net model in "
                               "MODELS_DIR nor a demucs model")
    bag = load_demucs(name, device)
    source = spec.get("source", VOCALS)
    if source not in bag.sources:
        raise ModelUnavailable(f"{name} has no source {source!r}")
    k = bag.sources.index(source)
    picked = [m for m in bag.members if m.weights[k] > 0]
    total = sum(m.weights[k] for m in picked)
    out = []
    for m in picked:  # the bag's other networks are dropped here, never run
        forward: Forward = _vocals_and_rest(m.forward, k)
        out.append((Member(forward=forward, segment_length=m.segment_length,
                           valid_length=m.valid_length, weights=[], module=m.module,
                           pad_to_segment=m.pad_to_segment), m.weights[k] / total))
    return out


def _mdx_members(spec: dict, device: torch.device) -> list[tuple[Member, float]]:
    from handler.core.models.mdx_net import load_network, mdx_member

    network = load_network(spec["model"], device, SOURCES, compensate=spec.get("compensate"))
    return [(mdx_member(network, network.params, []), 1.0)]


def load_preset(name: str, device: torch.device) -> LoadedModel:
    from handler.core.models.mdx_net import onnx_path

    preset = presets()[name]
    members: list[Member] = []
    loaded: dict[str, list[tuple[Member, float]]] = {}  # each model loaded once
    for spec in preset["members"]:
        model = spec["model"]
        if model not in loaded:
            loader = _mdx_members if onnx_path(model) is not None else _demucs_members
            try:
                loaded[model] = loader(spec, device)
            except ModelUnavailable as exc:
                raise ModelUnavailable(f"preset {name}: {exc.message}") from None
        for base, share in loaded[model]:
            forward = base.forward
            if spec.get("invert_input"):
                forward = _inverted(forward)
            if spec.get("average_inverted"):
                forward = _averaged(forward)
            weight = float(spec.get("weight", 1.0)) * share
            members.append(Member(
                forward=forward, segment_length=base.segment_length,
                valid_length=base.valid_length, weights=[weight, weight], module=base.module,
                pad_to_segment=base.pad_to_segment, chunker=base.chunker))
    return LoadedModel(name=name, sources=list(SOURCES), samplerate=44100, audio_channels=2,
                       members=members, device=device, default_overlap=0.25,
                       uses_shifts=False)


def check_preset_name(name: str) -> None:
    if name not in presets():
        raise InvalidInput(f"unknown preset {name!r}")
