"""Transformer pieces shared by BS-RoFormer and Mel-Band RoFormer.

Precision policy (matters under autocast on a GPU): norms, rotary angles and the rotation
itself run in float32 and are cast back, as audio-separator's native-fp16 path does; the
matrix products follow the autocast dtype.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

_HALF = (torch.float16, torch.bfloat16)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for one region (float32 maths); a no-op where autocast does not exist
    (the meta device, used to count FLOPs)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _HALF:
            normalized = F.normalize(x.float(), dim=-1).to(x.dtype)
        else:
            normalized = F.normalize(x, dim=-1)
        return normalized * self.scale * self.gamma


class Rotary(nn.Module):
    """Rotary position embedding over the whole head dimension (rotary-embedding-torch 0.6's
    'lang' frequencies; ``freqs`` is a parameter there, so it is one here: it is in the
    checkpoints)."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def _cos_sin(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._cache
        if c is not None and c[1] == device and c[0] >= n and not torch.compiler.is_compiling():
            return c[2][:n], c[3][:n]
        positions = torch.arange(n, device=device, dtype=torch.float32)
        angles = positions[:, None] * self.freqs.to(device=device, dtype=torch.float32)[None, :]
        angles = torch.repeat_interleave(angles, 2, dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if not torch.compiler.is_compiling():
            self._cache = (n, device, cos, sin)
        return cos, sin

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (..., n, d) -> t rotated by position along n; float32 arithmetic."""
        dtype = t.dtype
        with no_autocast(t.device):
            cos, sin = self._cos_sin(t.shape[-2], t.device)
            pairs = t.unflatten(-1, (-1, 2))
            half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
            out = t * cos * 1.0 + half * sin * 1.0
        return out.to(dtype)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(RMSNorm(dim), nn.Linear(dim, inner), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, rotary: Rotary | None,
                 flash: bool = True):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.rotary_embed = rotary
        self.flash = flash
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_gates = nn.Linear(dim, heads)
        self.to_out = nn.Sequential(nn.Linear(inner, dim, bias=False), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        if self.rotary_embed is not None:
            q, k = self.rotary_embed(q), self.rotary_embed(k)
        out = attend(q, k, v, None, self.flash)
        gates = self.to_gates(x).transpose(1, 2).unsqueeze(-1).sigmoid()  # b h n 1
        out = (out * gates).transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
           flash: bool) -> torch.Tensor:
    if flash:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return (torch.matmul(q, k.transpose(-1, -2)) * scale).softmax(dim=-1) @ v


class _SplitQKV(nn.Module):
    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # b n (3 h d) -> 3 b h d n
        b, n, _ = x.shape
        return x.view(b, n, 3, self.heads, -1).permute(2, 0, 3, 4, 1)


class _MergeHeads(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # b h d n -> b n (h d)
        b, h, d, n = x.shape
        return x.permute(0, 3, 1, 2).reshape(b, n, h * d)


class LinearAttention(nn.Module):
    """El-Nouby et al.'s cross-covariance attention (BS-RoFormer's optional linear layers)."""

    def __init__(self, dim: int, heads: int, dim_head: int, flash: bool, scale: float = 8.0):
        super().__init__()
        inner = dim_head * heads
        self.scale, self.flash = scale, flash
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Sequential(nn.Linear(dim, inner * 3, bias=False), _SplitQKV(heads))
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.to_out = nn.Sequential(_MergeHeads(), nn.Linear(inner, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_qkv(self.norm(x))
        q, k = (F.normalize(t.float(), dim=-1).to(t.dtype) if t.dtype in _HALF
                else F.normalize(t, dim=-1) for t in (q, k))
        q = q * self.temperature.exp()
        return self.to_out(attend(q, k, v, self.scale, self.flash))


class Transformer(nn.Module):
    def __init__(self, *, dim: int, depth: int, dim_head: int, heads: int, attn_dropout: float,
                 ff_dropout: float, ff_mult: int = 4, norm_output: bool = True,
                 rotary: Rotary | None = None, flash_attn: bool = True, linear_attn: bool = False):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            attn: nn.Module
            if linear_attn:
                attn = LinearAttention(dim, heads, dim_head, flash_attn)
            else:
                attn = Attention(dim, heads, dim_head, attn_dropout, rotary, flash_attn)
            self.layers.append(nn.ModuleList([attn, FeedForward(dim, ff_mult, ff_dropout)]))
        self.norm = RMSNorm(dim) if norm_output else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class BandSplit(nn.Module):
    def __init__(self, dim: int, dim_inputs: tuple[int, ...]):
        super().__init__()
        self.dim_inputs = dim_inputs
        self.to_features = nn.ModuleList(
            nn.Sequential(RMSNorm(d), nn.Linear(d, dim)) for d in dim_inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # b t F -> b t bands dim
        parts = x.split(self.dim_inputs, dim=-1)
        return torch.stack([f(p) for p, f in zip(parts, self.to_features, strict=True)], dim=-2)


def mlp(dim_in: int, dim_out: int, dim_hidden: int, hidden_layers: int) -> nn.Sequential:
    dims = (dim_in, *((dim_hidden,) * hidden_layers), dim_out)
    net: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        net.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            net.append(nn.Tanh())
    return nn.Sequential(*net)


class MaskEstimator(nn.Module):
    """One MLP per band. ``hidden_layers``: BS-RoFormer's depth d gives d - 1 hidden layers,
    Mel-Band RoFormer's gives d (so the two YAMLs' ``mask_estimator_depth`` differ by one)."""

    def __init__(self, dim: int, dim_inputs: tuple[int, ...], hidden_layers: int,
                 mlp_expansion_factor: int):
        super().__init__()
        hidden = dim * mlp_expansion_factor
        self.to_freqs = nn.ModuleList(
            nn.Sequential(mlp(dim, d * 2, hidden, hidden_layers), nn.GLU(dim=-1))
            for d in dim_inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # b t bands dim -> b t F
        return torch.cat([f(band) for band, f in zip(x.unbind(dim=-2), self.to_freqs, strict=True)],
                         dim=-1)
