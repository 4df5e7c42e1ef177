"""MDX23C: the TFC-TDF v3 U-Net on a complex-as-channels STFT (MSST ``TFC_TDF_net``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from handler.core.models.msst_arch.layers import no_autocast


class _Fp32Norm:
    """Normalisation statistics in float32 under autocast (half-precision variances of a
    U-Net's activations overflow or lose the small ones); the parameters are the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)  # type: ignore[misc]
        with no_autocast(x.device):
            return super().forward(x.float()).to(x.dtype)  # type: ignore[misc]


class _InstanceNorm(_Fp32Norm, nn.InstanceNorm2d):
    pass


class _GroupNorm(_Fp32Norm, nn.GroupNorm):
    pass


class _BatchNorm(_Fp32Norm, nn.BatchNorm2d):
    pass


def _norm(kind: str | None) -> Callable[[int], nn.Module]:
    def make(c: int) -> nn.Module:
        if kind == "BatchNorm":
            return _BatchNorm(c)
        if kind == "InstanceNorm":
            return _InstanceNorm(c, affine=True)
        if kind and "GroupNorm" in kind:
            return _GroupNorm(num_groups=int(kind.replace("GroupNorm", "")), num_channels=c)
        return nn.Identity()
    return make


def _act(kind: str) -> nn.Module:
    if kind == "gelu":
        return nn.GELU()
    if kind == "relu":
        return nn.ReLU()
    if kind.startswith("elu"):
        return nn.ELU(float(kind[3:]))
    raise ValueError(f"unknown activation {kind!r}")


class _ScaleConv(nn.Module):
    """Downscale (Conv2d) or Upscale (ConvTranspose2d) by ``scale``, after norm and activation."""

    def __init__(self, conv: type[nn.Conv2d] | type[nn.ConvTranspose2d], in_c: int, out_c: int,
                 scale: tuple[int, int], norm: Callable[[int], nn.Module], act: nn.Module):
        super().__init__()
        self.conv = nn.Sequential(norm(in_c), act,
                                  conv(in_c, out_c, kernel_size=scale, stride=scale, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TFC_TDF(nn.Module):  # noqa: N801 - the checkpoint's class name
    def __init__(self, in_c: int, c: int, blocks: int, f: int, bn: int,
                 norm: Callable[[int], nn.Module], act: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            block = nn.Module()
            block.tfc1 = nn.Sequential(norm(in_c), act, nn.Conv2d(in_c, c, 3, 1, 1, bias=False))
            block.tdf = nn.Sequential(norm(c), act, nn.Linear(f, f // bn, bias=False),
                                      norm(c), act, nn.Linear(f // bn, f, bias=False))
            block.tfc2 = nn.Sequential(norm(c), act, nn.Conv2d(c, c, 3, 1, 1, bias=False))
            block.shortcut = nn.Conv2d(in_c, c, 1, 1, 0, bias=False)
            self.blocks.append(block)
            in_c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            s = block.shortcut(x)
            x = block.tfc1(x)
            x = x + block.tdf(x)
            x = block.tfc2(x)
            x = x + s
        return x


class TFC_TDF_net(nn.Module):  # noqa: N801
    """Built from the YAML's ``audio`` and ``model`` sections; ``stems`` = outputs per chunk."""

    def __init__(self, audio: dict, model: dict, stems: int):
        super().__init__()
        norm = _norm(model.get("norm"))
        act = _act(model.get("act", "gelu"))
        self.num_target_instruments = stems
        self.num_subbands = k = int(model["num_subbands"])
        self.channels = int(audio.get("num_channels", 2))
        dim_c = k * self.channels * 2
        scale = tuple(int(v) for v in model["scale"])
        blocks, bn = int(model["num_blocks_per_scale"]), int(model["bottleneck_factor"])
        c, g = int(model["num_channels"]), int(model["growth"])
        self.n_fft, self.hop_length = int(audio["n_fft"]), int(audio["hop_length"])
        self.dim_f = int(audio["dim_f"])
        f = self.dim_f // k
        self.first_conv = nn.Conv2d(dim_c, c, 1, 1, 0, bias=False)
        self.encoder_blocks = nn.ModuleList()
        for _ in range(int(model["num_scales"])):
            block = nn.Module()
            block.tfc_tdf = TFC_TDF(c, c, blocks, f, bn, norm, act)
            block.downscale = _ScaleConv(nn.Conv2d, c, c + g, scale, norm, act)
            f //= scale[1]
            c += g
            self.encoder_blocks.append(block)
        self.bottleneck_block = TFC_TDF(c, c, blocks, f, bn, norm, act)
        self.decoder_blocks = nn.ModuleList()
        for _ in range(int(model["num_scales"])):
            block = nn.Module()
            block.upscale = _ScaleConv(nn.ConvTranspose2d, c, c - g, scale, norm, act)
            f *= scale[1]
            c -= g
            block.tfc_tdf = TFC_TDF(2 * c, c, blocks, f, bn, norm, act)
            self.decoder_blocks.append(block)
        self.final_conv = nn.Sequential(nn.Conv2d(c + dim_c, c, 1, 1, 0, bias=False), act,
                                        nn.Conv2d(c, stems * dim_c, 1, 1, 0, bias=False))
        self._window: torch.Tensor | None = None
        self.time_multiple = scale[0] ** int(model["num_scales"])  # frames must divide by this

    def _win(self, device: torch.device) -> torch.Tensor:
        if self._window is None or self._window.device != device:
            self._window = torch.hann_window(self.n_fft, periodic=True, device=device)
        return self._window

    def stft(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, t) -> (b, c*2, dim_f, frames): real and imaginary parts as channels."""
        b, c, t = x.shape
        with no_autocast(x.device):
            spec = torch.stft(x.float().reshape(b * c, t), self.n_fft, self.hop_length,
                              window=self._win(x.device), center=True, return_complex=True)
        spec = torch.view_as_real(spec).permute(0, 3, 1, 2)  # (b c) 2 f frames
        return spec.reshape(b, c * 2, spec.shape[-2], spec.shape[-1])[..., :self.dim_f, :]

    def istft(self, x: torch.Tensor) -> torch.Tensor:
        """(..., c*2, dim_f, frames) -> (..., c, samples); bins above dim_f are zero."""
        batch = x.shape[:-3]
        c2, f, t = x.shape[-3:]
        n = self.n_fft // 2 + 1
        x = torch.cat([x.float(), x.new_zeros(*batch, c2, n - f, t, dtype=torch.float32)], -2)
        x = x.reshape(-1, 2, n, t).permute(0, 2, 3, 1).contiguous()
        with no_autocast(x.device):
            audio = torch.istft(torch.view_as_complex(x), self.n_fft, self.hop_length,
                                window=self._win(x.device), center=True)
        return audio.reshape(*batch, c2 // 2, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, t) -> (b, stems, c, t)."""
        return self.istft(self.core(self.stft(x)))

    def core(self, spec: torch.Tensor) -> torch.Tensor:
        """(b, c*2, dim_f, frames) -> (b, stems, c*2, dim_f, frames): the U-Net on spectra."""
        k = self.num_subbands
        b, c, f, t = spec.shape
        mix = spec = spec.reshape(b, c * k, f // k, t)
        first = y = self.first_conv(spec)
        y = y.transpose(-1, -2)
        skips = []
        for block in self.encoder_blocks:
            y = block.tfc_tdf(y)
            skips.append(y)
            y = block.downscale(y)
        y = self.bottleneck_block(y)
        for block in self.decoder_blocks:
            y = block.upscale(y)
            y = block.tfc_tdf(torch.cat([y, skips.pop()], 1))
        y = y.transpose(-1, -2) * first
        y = self.final_conv(torch.cat([mix, y], 1))
        b, c, f, t = y.shape
        return y.reshape(b, c // k, f * k, t).reshape(b, self.num_target_instruments, -1, f * k, t)

