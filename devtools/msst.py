"""MSST test and bench support: small random-weight checkpoints with the public band layouts,
written the way the public files are (a ``.ckpt`` state dict + a ``.yaml`` with
``!!python/tuple``), and audio-separator 0.47.1's own code as the oracle (test-only, installed
``--no-deps``).

The oracle's package ``__init__`` imports its download/ONNX front end (onnxruntime, requests);
only its model classes and ``MDXCSeparator.demix`` are needed, so the subpackage is registered
without running that ``__init__``. Everything the oracle computes is its own code.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

# The band layout of viperx's BS-RoFormer 1297 (model_bs_roformer_ep_317_sdr_12.9755.yaml).
VIPERX_BANDS = (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129)

# Full-size configs as published (model sections), inference values as UVR/audio-separator ship.
BS_1297 = {
    "audio": {"chunk_size": 352800, "dim_f": 1024, "dim_t": 801, "hop_length": 441,
              "n_fft": 2048, "num_channels": 2, "sample_rate": 44100, "min_mean_abs": 0.0},
    "model": {"dim": 512, "depth": 12, "stereo": True, "num_stems": 1,
              "time_transformer_depth": 1, "freq_transformer_depth": 1,
              "linear_transformer_depth": 0, "freqs_per_bands": VIPERX_BANDS, "dim_head": 64,
              "heads": 8, "attn_dropout": 0.1, "ff_dropout": 0.1, "flash_attn": True,
              "dim_freqs_in": 1025, "stft_n_fft": 2048, "stft_hop_length": 441,
              "stft_win_length": 2048, "stft_normalized": False, "mask_estimator_depth": 2,
              "multi_stft_resolution_loss_weight": 1.0,
              "multi_stft_resolutions_window_sizes": (4096, 2048, 1024, 512, 256),
              "multi_stft_hop_size": 147, "multi_stft_normalized": False},
    "training": {"instruments": ["vocals", "other"], "target_instrument": "vocals",
                 "use_amp": True},
    "inference": {"batch_size": 2, "dim_t": 801, "num_overlap": 4},
}
KIM_MEL = {
    "audio": {"chunk_size": 352800, "dim_f": 1024, "dim_t": 256, "hop_length": 441,
              "n_fft": 2048, "num_channels": 2, "sample_rate": 44100, "min_mean_abs": 0.0},
    "model": {"dim": 384, "depth": 6, "stereo": True, "num_stems": 1,
              "time_transformer_depth": 1, "freq_transformer_depth": 1, "num_bands": 60,
              "dim_head": 64, "heads": 8, "attn_dropout": 0, "ff_dropout": 0,
              "flash_attn": True, "dim_freqs_in": 1025, "sample_rate": 44100,
              "stft_n_fft": 2048, "stft_hop_length": 441, "stft_win_length": 2048,
              "stft_normalized": False, "mask_estimator_depth": 2,
              "multi_stft_resolution_loss_weight": 1.0,
              "multi_stft_resolutions_window_sizes": (4096, 2048, 1024, 512, 256),
              "multi_stft_hop_size": 147, "multi_stft_normalized": False},
    "training": {"instruments": ["vocals", "other"], "target_instrument": "vocals"},
    "inference": {"batch_size": 1, "dim_t": 1101, "num_overlap": 1, "chunk_size": 352800},
}
# UVR's MDX23C InstVoc HQ (model_2_stem_full_band_8k.yaml).
MDX23C_INSTVOC = {
    "audio": {"chunk_size": 261120, "dim_f": 4096, "dim_t": 256, "hop_length": 1024,
              "n_fft": 8192, "num_channels": 2, "sample_rate": 44100, "min_mean_abs": 0.001},
    "model": {"act": "gelu", "bottleneck_factor": 4, "growth": 128, "norm": "InstanceNorm",
              "num_blocks_per_scale": 2, "num_channels": 128, "num_scales": 5,
              "num_subbands": 4, "scale": [2, 2]},
    "training": {"instruments": ["Vocals", "Instrumental"], "target_instrument": None},
    "inference": {"batch_size": 1, "dim_t": 256, "num_overlap": 8},
}


def small(cfg: dict, arch: str, *, dim_t: int, num_overlap: int) -> dict:
    """The same band layout and STFT, tiny transformer/U-Net, short chunks (many per input)."""
    cfg = copy.deepcopy(cfg)
    cfg["inference"].update(dim_t=dim_t, num_overlap=num_overlap)
    if arch == "mdx23c":
        cfg["model"].update(num_channels=8, growth=4, num_scales=2, num_blocks_per_scale=1)
    else:
        cfg["model"].update(dim=16, depth=1, heads=2, dim_head=8)
    return cfg


def write_config(path: Path, cfg: dict) -> None:
    """YAML as the public files spell it: tuples tagged ``!!python/tuple``."""
    path.write_text(yaml.dump(cfg, Dumper=yaml.Dumper, sort_keys=False))


def random_state(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random weights scaled so that a tiny network still has an audible, non-trivial output."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in net.state_dict().items():
        if k.endswith("rotary_embed.freqs") or not v.is_floating_point():
            state[k] = v.clone()
        elif k.endswith(("gamma", ".weight")) and v.dim() == 1:
            state[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            fan_in = v[0].numel() if v.dim() > 1 else v.numel()
            state[k] = torch.randn(v.shape, generator=g) / max(1.0, fan_in) ** 0.5
    return state


def write_pair(root: Path, name: str, cfg: dict, seed: int = 0, wrap: str | None = None,
               half: bool = False) -> dict[str, torch.Tensor]:
    """``root/name.yaml`` + ``root/name.ckpt`` with random weights for our network's keys."""
    from handler.core.models import msst

    root.mkdir(parents=True, exist_ok=True)
    write_config(root / f"{name}.yaml", cfg)
    arch = msst.architecture(cfg)
    spec = msst.spec_of(cfg, arch)
    net = msst.build_network(cfg, arch, 1 if spec.target else len(spec.sources))
    state = random_state(net, seed)
    saved: Any = {k: v.half() for k, v in state.items()} if half else state
    if wrap:
        saved = {wrap: saved, "epoch": 3}
    torch.save(saved, root / f"{name}.ckpt")
    return state


def stereo_noise(seconds: float, sr: int = 44100, seed: int = 0) -> np.ndarray:
    """Band-limited noise with a slow envelope (non-stationary, so chunk edges matter)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    x = rng.standard_normal((2, n)).astype(np.float32)
    t = np.arange(n) / sr
    env = 0.3 + 0.25 * np.sin(2 * np.pi * 0.37 * t) * np.sin(2 * np.pi * 0.05 * t + 1)
    tone = 0.2 * np.sin(2 * np.pi * 220 * t * (1 + 0.01 * np.sin(t)))
    return (0.3 * x * env + tone).astype(np.float32)


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    noise = np.sum((ref - test) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))


# -- the oracle -------------------------------------------------------------------------------
def _oracle_package() -> None:
    """Import audio-separator's package as its users do (its ``__init__`` included), so that
    the MDX oracle (devtools/mdx.py) finds the same modules whichever runs first."""
    from devtools.mdx import _stub_onnx2torch

    _stub_onnx2torch()
    import audio_separator.separator  # noqa: F401


def oracle_network(ckpt: Path, cfg_path: Path) -> tuple[torch.nn.Module, dict]:
    """audio-separator's own loading: its YAML reading (FullLoader), its RoformerLoader or
    TFC_TDF_net + torch.load."""
    _oracle_package()
    from ml_collections import ConfigDict

    with open(cfg_path, encoding="utf-8") as f:
        model_data = yaml.load(f, Loader=yaml.FullLoader)  # noqa: S506 - our own test file
    if "num_bands" in model_data["model"] or "freqs_per_bands" in model_data["model"]:
        from audio_separator.separator.roformer.roformer_loader import RoformerLoader

        model_data["is_roformer"] = True
        result = RoformerLoader().load_model(str(ckpt), model_data, device="cpu")
        if not result.success:
            raise RuntimeError(result.error_message)
        net = result.model
    else:
        from audio_separator.separator.uvr_lib_v5.tfc_tdf_v3 import TFC_TDF_net

        net = TFC_TDF_net(ConfigDict(model_data), device=torch.device("cpu"))
        net.load_state_dict(torch.load(ckpt, map_location="cpu"))
    return net.eval(), model_data


def oracle_meta_network(cfg: dict) -> torch.nn.Module:
    """audio-separator's class for a config, built as its loader builds it (call it under
    ``torch.device('meta')`` for full-size configs)."""
    _oracle_package()
    from ml_collections import ConfigDict

    if "num_bands" in cfg["model"] or "freqs_per_bands" in cfg["model"]:
        from audio_separator.separator.roformer.roformer_loader import RoformerLoader

        loader = RoformerLoader()
        make = (loader._create_mel_band_roformer if "num_bands" in cfg["model"]
                else loader._create_bs_roformer)
        return make(dict(cfg["model"]))
    from audio_separator.separator.uvr_lib_v5.tfc_tdf_v3 import TFC_TDF_net

    return TFC_TDF_net(ConfigDict(cfg), device=torch.device("meta"))


def oracle_demix(ckpt: Path, cfg_path: Path, mix: np.ndarray, **arch: Any) -> dict[str, np.ndarray]:
    """``MDXCSeparator.demix`` on a separator built without its download front end."""
    _oracle_package()
    from audio_separator.separator.architectures.mdxc_separator import MDXCSeparator
    from ml_collections import ConfigDict

    net, model_data = oracle_network(ckpt, cfg_path)
    sep = MDXCSeparator.__new__(MDXCSeparator)
    training = model_data["training"]
    instruments = training["instruments"]
    target = training.get("target_instrument")
    primary = target or instruments[0]
    sep.__dict__.update(
        logger=logging.getLogger("oracle"), pitch_shift=0, override_model_segment_size=False,
        segment_size=256, is_roformer=bool(model_data.get("is_roformer")),
        model_data=model_data, model_data_cfgdict=ConfigDict(model_data), model_run=net,
        torch_device=torch.device("cpu"), is_torch_compiled=False,
        overlap=arch.get("overlap") or model_data["inference"].get("num_overlap") or 8,
        batch_size=arch.get("batch_size") or model_data["inference"].get("batch_size") or 1,
        is_primary_stem_main_target=bool(target), primary_stem_name=primary,
        secondary_stem_name=next(i for i in instruments if i != primary),
    )
    out = sep.demix(mix.copy())
    if not isinstance(out, dict):
        out = {primary: out}
    return {k.lower(): np.asarray(v, np.float32) for k, v in out.items()}
