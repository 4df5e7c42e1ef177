"""Chunking rules: how a model family cuts a track into network-sized windows and blends them.

The engine (``handler.core.engine``) runs one *lane* per (member, shift): a streaming weighted
overlap-add in lane coordinates, where lane position ``p`` holds input sample ``p - prefix``
(zeros outside the track). Which windows a lane runs, where their output lands and how it is
weighted is the family's rule; the engine's loop has no family special cases.

Each family's reference inference differs only here: demucs's centred, triangle-crossfaded
chunks (``DemucsChunking``); a Hann-weighted overlap-add with zero padding (UVR MDX-Net); a
flush-with-the-end last chunk (MSST RoFormers); a plain sum over a fixed number of overlaps
(MDX23C).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Window:
    """One network call of a lane."""

    read_start: int  # lane position of the network input's first sample
    read_len: int  # network input length (windows of equal length are batched)
    out_start: int  # lane position where the kept output lands
    out_len: int
    trim: int  # offset of the kept part inside the network output
    weight: torch.Tensor  # (out_len,) overlap-add weight


class _Done:
    def __repr__(self) -> str:
        return "DONE"


DONE = _Done()  # window(k) past the last chunk (known only once the input length is)


@dataclass
class ChunkSettings:
    """What a job decides about chunking; a rule reads the parts its family uses."""

    segment: int  # samples per chunk (the member's own unless the job set one)
    overlap: float  # fraction of a chunk shared with the next
    transition_power: float = 1.0
    shift_prefix: int = 0  # demucs's shift trick: zeros in front of the track
    batch_size: int = 1
    num_overlap: int | None = None  # MSST families: a count of overlapping chunks (their own)


class ChunkRule(Protocol):
    prefix: int  # lane positions before input sample 0
    norm: float | None  # None: sum(w*y) / sum(w); a number: sum(w*y) / norm
    span: int  # bound of (out_start + out_len) - safe_end over one batch: the ring's size

    def lane_total(self, n: int) -> int:
        """Lane length once the input is known to hold ``n`` samples."""
        ...

    def window(self, k: int, total: int | None, available: int) -> Window | _Done | None:
        """Chunk ``k``; None while its input is not decoded yet. ``total``: lane_total(n)
        once n is known, else None; ``available``: lane positions decoded so far."""
        ...

    def safe_end(self, k: int, total: int | None, available: int) -> int:
        """Lane positions below this are final once chunks before ``k`` are accumulated."""
        ...

    def read_floor(self, k: int, total: int | None, available: int) -> int:
        """No chunk from ``k`` on reads a lane position below this."""
        ...

    def chunks_total(self, total: int) -> int: ...


def crossfade_weight(segment_length: int, transition_power: float) -> torch.Tensor:
    """demucs's triangle: maximal in the middle of a chunk, normalised, to a power."""
    half = segment_length // 2
    weight = torch.cat(
        [torch.arange(1, half + 1), torch.arange(segment_length - half, 0, -1)]
    ).float()
    return (weight / weight.max()) ** transition_power


class DemucsChunking:
    """demucs's ``apply_model``: chunks every ``stride`` samples, each centred in the window
    its network wants (``TensorChunk.padded``), blended by a triangle crossfade."""

    norm = None

    def __init__(
        self,
        settings: ChunkSettings,
        valid_length: Callable[[int], int],
        pad_to_segment: bool,
    ):
        self.seg = settings.segment
        self.stride = int((1 - settings.overlap) * self.seg)
        if self.stride <= 0:
            raise ValueError("overlap leaves no stride")
        self.prefix = settings.shift_prefix
        self.weight = crossfade_weight(self.seg, settings.transition_power)
        self._valid_length = valid_length
        self._pad = pad_to_segment
        self.valid_full = self._valid(self.seg)
        # A batch reaches (batch - 1) strides plus one segment past the next chunk's start.
        self.span = self.seg + (settings.batch_size - 1) * self.stride

    def _valid(self, chunk: int) -> int:
        return self.seg if self._pad else int(self._valid_length(chunk))

    def lane_total(self, n: int) -> int:
        return n + self.prefix

    def window(self, k: int, total: int | None, available: int) -> Window | _Done | None:
        offset = k * self.stride
        if total is not None and offset >= total:
            return DONE
        chunk = self.seg if total is None else min(self.seg, total - offset)
        valid = self.valid_full if chunk == self.seg else self._valid(chunk)
        start = offset - (valid - chunk) // 2
        if total is None and available < start + valid:
            return None
        return Window(start, valid, offset, chunk, (valid - chunk) // 2, self.weight[:chunk])

    def safe_end(self, k: int, total: int | None, available: int) -> int:
        offset = k * self.stride
        return total if total is not None and offset >= total else offset

    def read_floor(self, k: int, total: int | None, available: int) -> int:
        return k * self.stride - self.valid_full

    def chunks_total(self, total: int) -> int:
        return -(-total // self.stride)
