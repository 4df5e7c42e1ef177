"""MSST-format models: ``MODELS_DIR/<name>.ckpt`` (a torch state dict) + ``<name>.yaml``.

BS-RoFormer, Mel-Band RoFormer and MDX23C checkpoints of the Music-Source-Separation-Training
layout (viperx, Kim, unwa, becruily, Gabox, UVR's MDX23C ...) are all such a pair. The files
are untrusted: the checkpoint is read with ``torch.load(weights_only=True)`` (no pickled code
runs) and the YAML with a safe loader that adds only ``!!python/tuple``. The architecture comes
from the YAML, never from the file name.

Chunking and stems follow audio-separator 0.47.1's MDXC path (what users of these checkpoints
run), at unity gain: see ``msst_chunking``.
"""

from __future__ import annotations

import logging
import pickle
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from handler import config
from handler.config import models_dir
from handler.core.models.base import PRECISIONS, LoadedModel, Member
from handler.errors import InvalidInput, ModelUnavailable

log = logging.getLogger(__name__)

BS_ROFORMER, MEL_ROFORMER, MDX23C = "bs_roformer", "mel_band_roformer", "mdx23c"
ARCHITECTURES = (BS_ROFORMER, MEL_ROFORMER, MDX23C)
_ALIASES = {
    "bs_roformer": BS_ROFORMER, "bsroformer": BS_ROFORMER, "bs-roformer": BS_ROFORMER,
    "mel_band_roformer": MEL_ROFORMER, "melbandroformer": MEL_ROFORMER,
    "mel-band-roformer": MEL_ROFORMER, "mel_roformer": MEL_ROFORMER,
    "mdx23c": MDX23C, "tfc_tdf_net": MDX23C, "tfc_tdf_v3": MDX23C,
}
_TFC_TDF_KEYS = ("num_subbands", "num_scales", "growth", "bottleneck_factor")
_WRAPPERS = ("state_dict", "model_state_dict", "model", "state")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_READ_LIMIT = 1 << 20  # a config is a few kB; refuse to parse anything huge


class _TupleSafeLoader(yaml.SafeLoader):
    """SafeLoader plus ``!!python/tuple`` (the MSST configs' one non-standard tag)."""


_TupleSafeLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple",
    lambda loader, node: tuple(loader.construct_sequence(node, deep=True)),
)


# -- files ------------------------------------------------------------------------------------
def pair_paths(name: str, root: Path | None = None) -> tuple[Path, Path]:
    root = models_dir() if root is None else root
    return root / f"{name}.ckpt", root / f"{name}.yaml"


def is_msst_name(name: str, root: Path | None = None) -> bool:
    """True when ``name`` is a safe file stem and MODELS_DIR holds its .ckpt + .yaml pair."""
    if not _NAME.match(name) or name.endswith((".ckpt", ".yaml")):
        return False
    ckpt, cfg = pair_paths(name, root)
    return ckpt.is_file() and cfg.is_file()


def available(root: Path | None = None) -> list[str]:
    root = models_dir() if root is None else root
    if not root.is_dir():
        return []
    return sorted(p.stem for p in root.glob("*.yaml") if is_msst_name(p.stem, root))


def read_config(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            text = f.read(_READ_LIMIT + 1)
    except OSError as exc:
        raise ModelUnavailable(f"config {path.name} cannot be read ({exc.strerror})") from None
    if len(text) > _READ_LIMIT:
        raise ModelUnavailable(f"config {path.name} is larger than {_READ_LIMIT} bytes")
    try:
        cfg = yaml.load(text, Loader=_TupleSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        # Unsafe tags (python/object, python/name ...) land here: SafeLoader has no constructor.
        raise ModelUnavailable(f"config {path.name} is not a valid MSST YAML: "
                               f"{str(exc).splitlines()[0]}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise ModelUnavailable(f"config {path.name} has no 'model' section")
    return cfg


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError,
            AttributeError, ImportError) as exc:
        # weights_only refuses globals it does not allow-list: a payload is never executed.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelUnavailable(f"checkpoint {path.name} is not a plain tensor state dict "
                               f"({first[:200]})") from None
    except OSError as exc:
        raise ModelUnavailable(f"checkpoint {path.name} cannot be read ({exc.strerror})") from None
    for _ in range(2):  # e.g. {"state_dict": {...}} or {"model": {"state_dict": ...}}
        if isinstance(obj, dict) and not _is_tensor_dict(obj):
            inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, dict) or not obj or not _is_tensor_dict(obj):
        raise ModelUnavailable(f"checkpoint {path.name} holds no state dict of tensors")
    return obj


def _is_tensor_dict(d: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


# -- architecture -----------------------------------------------------------------------------
def architecture(cfg: dict[str, Any]) -> str:
    """Which network the YAML describes (an explicit field wins; the file name never counts)."""
    model = cfg["model"]
    for where in (cfg, model):
        for key in ("model_type", "type", "architecture"):
            value = where.get(key)
            if isinstance(value, str):
                arch = _ALIASES.get(value.strip().lower())
                if arch is None:
                    raise ModelUnavailable(
                        f"{key} {value!r} is not one of {', '.join(ARCHITECTURES)}")
                return arch
    has_bs, has_mel = "freqs_per_bands" in model, "num_bands" in model
    if has_bs and has_mel:
        raise ModelUnavailable("config has both freqs_per_bands (BS-RoFormer) and num_bands "
                               "(Mel-Band RoFormer); set model_type to say which")
    if has_bs:
        return BS_ROFORMER
    if has_mel:
        return MEL_ROFORMER
    if all(k in model for k in _TFC_TDF_KEYS):
        return MDX23C
    raise ModelUnavailable("config describes no supported architecture (needs freqs_per_bands, "
                           "num_bands or the TFC-TDF keys, or an explicit model_type)")


@dataclass
class MsstSpec:
    """What the engine needs from the YAML besides the network."""

    arch: str
    sources: list[str]  # lower-case stem names, in output order
    target: str | None  # single-target model: sources = [target, the rest (mix - target)]
    samplerate: int
    audio_channels: int
    hop: int  # STFT hop of the model
    dim_t: int  # inference.dim_t: chunk = hop * (dim_t - 1)
    num_overlap: int  # inference.num_overlap (audio-separator's fallback: 8)
    time_multiple: int = 1  # MDX23C: frames per chunk must divide by this

    @property
    def chunk(self) -> int:
        return self.hop * (self.dim_t - 1)


def spec_of(cfg: dict[str, Any], arch: str) -> MsstSpec:
    model, audio = cfg["model"], cfg.get("audio") or {}
    training, inference = cfg.get("training") or {}, cfg.get("inference") or {}
    instruments = [str(i).lower() for i in training.get("instruments") or []]
    target = training.get("target_instrument")
    target = str(target).lower() if target else None
    if target:
        rest = next((i for i in instruments if i != target), "other")
        sources = [target, rest]
    else:
        sources = instruments
    if not sources or len(set(sources)) != len(sources):
        raise ModelUnavailable(f"config's training.instruments {instruments} are empty or repeat")
    if arch == MDX23C:
        hop = int(audio.get("hop_length", 0))
        channels = int(audio.get("num_channels", 2))
        scale = model.get("scale") or (2, 2)
        time_multiple = int(scale[0]) ** int(model.get("num_scales", 0))
    else:
        # audio-separator: the model's STFT hop, falling back to audio.hop_length.
        hop = int(model.get("stft_hop_length") or audio.get("hop_length") or 512)
        channels = 2 if model.get("stereo") else 1
        time_multiple = 1
    dim_t = int(inference.get("dim_t") or audio.get("dim_t") or 0)
    num_overlap = int(inference.get("num_overlap") or 8)
    sr = int(model.get("sample_rate") or audio.get("sample_rate") or 44100)
    if hop <= 0 or dim_t < 2 or num_overlap < 1 or hop * (dim_t - 1) < num_overlap:
        raise ModelUnavailable(f"config gives no usable chunk (hop {hop}, inference.dim_t {dim_t},"
                               f" num_overlap {num_overlap})")
    if dim_t % time_multiple:
        raise ModelUnavailable(f"inference.dim_t {dim_t} must be a multiple of {time_multiple} "
                               "(the U-Net halves the frames num_scales times)")
    return MsstSpec(arch, sources, target, sr, channels, hop, dim_t, num_overlap, time_multiple)


def build_network(cfg: dict[str, Any], arch: str, stems: int) -> torch.nn.Module:
    """The network on whatever device is current (``torch.device('meta')`` works)."""
    from handler.core.models.msst_arch.mdx23c import TFC_TDF_net
    from handler.core.models.msst_arch.roformer import BSRoformer, MelBandRoformer

    kwargs = dict(cfg["model"])
    for key in ("model_type", "type", "architecture"):
        kwargs.pop(key, None)
    try:
        if arch == MDX23C:
            return TFC_TDF_net(cfg.get("audio") or {}, kwargs, stems)
        kwargs.setdefault("num_stems", stems)
        cls = BSRoformer if arch == BS_ROFORMER else MelBandRoformer
        return cls(**kwargs)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise ModelUnavailable(f"config's model section does not build a {arch}: {exc}") from None


def _stems_in_network(spec: MsstSpec) -> int:
    return 1 if spec.target else len(spec.sources)


# -- loading ----------------------------------------------------------------------------------
def load_network(ckpt: Path, cfg_path: Path) -> tuple[torch.nn.Module, MsstSpec]:
    cfg = read_config(cfg_path)
    arch = architecture(cfg)
    spec = spec_of(cfg, arch)
    state = read_state_dict(ckpt)
    net = build_network(cfg, arch, _stems_in_network(spec))
    produced = getattr(net, "num_stems", getattr(net, "num_target_instruments", 1))
    if produced != _stems_in_network(spec):
        raise ModelUnavailable(f"the network has {produced} outputs but the config names "
                               f"{_stems_in_network(spec)} (training.instruments, "
                               "target_instrument)")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ModelUnavailable(
            f"checkpoint {ckpt.name} does not match its config ({detail})") from None
    del state
    net.eval()  # the BS YAMLs set dropout 0.1
    net.requires_grad_(False)
    return net, spec


def load_msst(name: str, device: torch.device) -> LoadedModel:
    if not _NAME.match(name):
        raise InvalidInput(f"model name {name!r} is not a plain file name")
    ckpt, cfg_path = pair_paths(name)
    if not (ckpt.is_file() and cfg_path.is_file()):
        raise ModelUnavailable(
            f"model {name!r} needs {ckpt.name} and {cfg_path.name} in MODELS_DIR")
    net, spec = load_network(ckpt, cfg_path)
    net.to(device)
    model = LoadedModel(
        name=name, sources=list(spec.sources), samplerate=spec.samplerate,
        audio_channels=spec.audio_channels, members=[member_for(net, spec)], device=device,
        default_shifts=0,  # the reference runs no shift trick
    )
    if device.type == "cuda":
        model.default_batch_size = fit_batch(model, PRECISIONS.get(config.precision()))
    return model


def fit_batch(model: LoadedModel, dtype: torch.dtype | None, share: float = 0.5,
              cap: int = 16) -> int:
    """Chunks per forward pass that fit in ``share`` of the GPU's free memory: one chunk is
    run (which also warms the kernels up) and its peak allocation measured."""
    device = model.device
    member = model.members[0]
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    x = torch.zeros(1, model.audio_channels, member.segment_length, device=device)
    autocast = torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext()
    with torch.inference_mode(), autocast:
        member.forward(x)
    per_chunk = max(1, torch.cuda.max_memory_allocated(device) - base)
    del x
    torch.cuda.empty_cache()
    batch = max(1, min(cap, int(free * share // per_chunk)))
    log.info("%s: %.2f GiB per chunk on the GPU, %.1f GiB free: batches of %d", model.name,
             per_chunk / 2**30, free / 2**30, batch)
    return batch


def member_for(net: torch.nn.Module, spec: MsstSpec) -> Member:
    from handler.core.models.msst_chunking import chunker_for

    def forward(x: torch.Tensor) -> torch.Tensor:
        """(b, c, t) -> (b, sources, c, t); the RoFormers' iSTFT drops a last partial hop,
        which the reference leaves at zero (and zero weight), as this does."""
        y = net(x)
        if y.dim() == 3:  # (b, c, t): one stem
            y = y.unsqueeze(1)
        if y.shape[-1] != x.shape[-1]:
            y = torch.nn.functional.pad(y, (0, x.shape[-1] - y.shape[-1]))[..., :x.shape[-1]]
        if spec.target:  # the other stem is the mix minus the target
            y = torch.cat([y[:, :1], x.unsqueeze(1).to(y.dtype) - y[:, :1]], dim=1)
        return y

    return Member(forward=forward, segment_length=spec.chunk, valid_length=lambda n: n,
                  weights=[1.0] * len(spec.sources), module=net, chunker=chunker_for(spec))
