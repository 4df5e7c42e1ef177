"""Chunk rules of the MSST family: audio-separator 0.47.1's ``MDXCSeparator.demix``, streamed.

RoFormers: chunk C = stft_hop × (inference.dim_t − 1), step = C // num_overlap; chunks start at
0, step, 2·step, … while they end before the input does, then one last chunk flush with the end
(the whole input when it is shorter than C); no padding; each output is weighted by a symmetric
Hamming window of C (its first ``len`` samples for a short chunk) and the sum is divided by the
summed weights.

MDX23C: C = hop × (dim_t − 1), hop H = C // num_overlap; the input gets C − H zeros in front and
enough at the end for a whole number of hops plus C − H; chunks every H; the plain sum is
divided by num_overlap (not by the number of chunks covering a sample, as the reference does).

Unity gain: the reference's peak normalisation of input and outputs (its 0.9 limiter) is left
out on purpose; the numbers it divides and multiplies are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from handler.core.chunking import DONE, Window

if TYPE_CHECKING:
    from handler.core.models.base import Member
    from handler.core.models.msst import MsstSpec


def hamming(n: int) -> torch.Tensor:
    """scipy.signal.windows.hamming(n) (symmetric), computed the same way, as float32."""
    if n == 1:
        return torch.ones(1)
    fac = np.linspace(-np.pi, np.pi, n)
    w = np.zeros(n)
    w += 0.54 * np.cos(0 * fac)
    w += 0.46 * np.cos(1 * fac)
    return torch.from_numpy(w).float()


@dataclass
class RoformerRule:
    """Hamming-weighted chunks with an end-aligned last chunk (see the module docstring)."""

    chunk: int
    step: int
    batch_size: int = 1
    prefix: int = 0
    norm: float | None = None
    weight: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.step <= self.chunk:
            raise ValueError("step must be in (0, chunk]")
        self.weight = hamming(self.chunk)
        self.span = self.chunk + self.batch_size * self.step

    def lane_total(self, n: int) -> int:
        return n + self.prefix

    def _regular(self, total: int) -> int:
        """Chunks that end before the lane does (the end-aligned one comes after them)."""
        return 0 if total <= self.chunk else -(-(total - self.chunk) // self.step)

    def chunks_total(self, total: int) -> int:
        return self._regular(total) + 1 if total > 0 else 0

    def window(self, k: int, total: int | None, available: int) -> Any:
        start = k * self.step
        if total is None:
            # Regular only if the input provably goes on past its end.
            if start + self.chunk < available:
                return Window(start, self.chunk, start, self.chunk, 0, self.weight)
            return None
        regular = self._regular(total)
        if k < regular:
            return Window(start, self.chunk, start, self.chunk, 0, self.weight)
        if k > regular or total == 0:
            return DONE
        length = min(self.chunk, total)
        tail = total - length
        return Window(tail, length, tail, length, 0, self.weight[:length])

    def safe_end(self, k: int, total: int | None, available: int) -> int:
        if total is None:
            # Chunk k may yet be the end-aligned one, which starts at (n - C) >= available - C.
            return min(k * self.step, max(0, available - self.chunk))
        regular = self._regular(total)
        if k < regular:
            return k * self.step
        if k == regular and total > 0:
            return max(0, total - self.chunk)
        return total

    def read_floor(self, k: int, total: int | None, available: int) -> int:
        return self.safe_end(k, total, available)  # chunks read exactly where they write


@dataclass
class PaddedSumRule:
    """MDX23C: zero-padded, unweighted chunks every H, the sum divided by num_overlap."""

    chunk: int
    hop: int
    num_overlap: int
    batch_size: int = 1
    shift_prefix: int = 0
    weight: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.hop <= self.chunk:
            raise ValueError("hop must be in (0, chunk]")
        self.prefix = self.shift_prefix + self.chunk - self.hop
        self.norm: float | None = float(self.num_overlap)
        self.weight = torch.ones(self.chunk)
        self.span = self.chunk + self.batch_size * self.hop

    def lane_total(self, n: int) -> int:
        m = n + self.shift_prefix
        pad = self.hop - (m - self.chunk) % self.hop  # Python's modulo, as the reference
        return self.prefix + n + pad + self.chunk - self.hop

    def chunks_total(self, total: int) -> int:
        return (total - self.chunk) // self.hop + 1

    def window(self, k: int, total: int | None, available: int) -> Any:
        start = k * self.hop
        if total is None:
            if start + self.chunk <= available:  # the padded lane is longer than the input
                return Window(start, self.chunk, start, self.chunk, 0, self.weight)
            return None
        if k >= self.chunks_total(total):
            return DONE
        return Window(start, self.chunk, start, self.chunk, 0, self.weight)

    def safe_end(self, k: int, total: int | None, available: int) -> int:
        if total is not None and k >= self.chunks_total(total):
            return total
        return k * self.hop

    def read_floor(self, k: int, total: int | None, available: int) -> int:
        return k * self.hop


def _chunk_for(spec: MsstSpec, segment: int | None) -> int:
    """The chunk length: the YAML's, or a job's ``segment`` rounded to what the network takes
    (a whole number of STFT hops; for MDX23C, frames divisible by its U-Net's downscaling)."""
    if segment is None or segment == spec.chunk:
        return spec.chunk
    if spec.time_multiple > 1:
        frames = max(1, round((segment / spec.hop + 1) / spec.time_multiple)) * spec.time_multiple
        return spec.hop * (frames - 1)
    return max(1, round(segment / spec.hop)) * spec.hop


def chunker_for(spec: MsstSpec) -> Callable[[Member, Any], Any]:
    def make(member: Member, settings: Any) -> RoformerRule | PaddedSumRule:
        segment = getattr(settings, "segment", None)
        chunk = _chunk_for(spec, int(segment) if segment else None)
        overlaps = getattr(settings, "num_overlap", None) or spec.num_overlap
        if overlaps > chunk:
            raise ValueError(f"num_overlap {overlaps} exceeds the chunk of {chunk} samples")
        batch = max(1, int(getattr(settings, "batch_size", 1) or 1))
        shift = int(getattr(settings, "shift_prefix", 0) or 0)
        if spec.arch == "mdx23c":
            return PaddedSumRule(chunk, chunk // overlaps, overlaps, batch, shift)
        return RoformerRule(chunk, chunk // overlaps, batch, prefix=shift)
    return make
