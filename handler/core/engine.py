"""The chunked separation engine: streaming weighted overlap-add, as demucs's ``apply_model``.

demucs holds the whole track and all stems in memory; this engine consumes decoded blocks and
emits finished output as soon as no later chunk can touch it, so memory is bounded by a few
chunks whatever the track's length. The arithmetic is demucs's own (same chunk offsets,
centred context padding, triangular crossfade weights, shift trick, bag weights), so for the
same model and shift offsets the output equals ``apply_model``'s to float rounding.

Each (member, shift) pair is a *lane*: an independent overlap-add over the shared input.
Lanes finish samples at their own pace; the combiner emits what every lane has finished.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from handler.core.models.base import LoadedModel, Member
from handler.errors import Cancelled


@dataclass
class EngineOptions:
    shifts: int = 1  # demucs's shift trick: random offsets in [0, 0.5 s], predictions averaged
    overlap: float = 0.25
    segment: float | None = None  # seconds per chunk; None = each network's own
    transition_power: float = 1.0
    batch_size: int = 1  # chunks per forward pass
    seed: int | None = 0  # shift offsets are drawn from random.Random(seed); None = random
    shift_offsets: list[int] | None = None  # explicit demucs-style offsets (tests)
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16; None = the model's own
    # nn.MultiheadAttention's "fast path" computes self-attention with explicit score matrices
    # (bmm + softmax) on the CPU; off, it goes through scaled_dot_product_attention (fused,
    # flash-style). Same maths to ~1e-6; HTDemucs's transformer runs much faster.
    sdpa_attention: bool = True


ProgressFn = Callable[[int, int], None]


def crossfade_weight(segment_length: int, transition_power: float) -> torch.Tensor:
    """demucs's triangle: maximal in the middle of a chunk, normalised, to a power."""
    half = segment_length // 2
    weight = torch.cat(
        [torch.arange(1, half + 1), torch.arange(segment_length - half, 0, -1)]
    ).float()
    return (weight / weight.max()) ** transition_power


def _spans(a: int, b: int, cap: int) -> list[tuple[int, int, int]]:
    """Positions [a, b) in a ring of ``cap`` slots, as (lo, hi, off) pieces (at most two):
    slots [lo, hi) hold positions a + off onwards."""
    pieces = []
    off = 0
    while a + off < b:
        lo = (a + off) % cap
        hi = min(cap, lo + b - a - off)
        pieces.append((lo, hi, off))
        off += hi - lo
    return pieces


class _InputRing:
    """The decoded input no lane has finished with, in one buffer allocated up front (it
    grows, doubling, only if the input ever outruns it).

    Fixed-size buffers keep the heap the same shape chunk after chunk (a fresh, differently
    sized array every block lets the allocator's free space fragment around the network's
    activations, and RSS creeps up over an hour-long input).
    """

    def __init__(self, channels: int, capacity: int):
        self.buf = np.zeros((channels, max(1, capacity)), np.float32)
        self.start = 0  # oldest position kept
        self.end = 0  # next position to write

    def append(self, block: np.ndarray) -> None:
        n = block.shape[1]
        if self.end + n - self.start > self.buf.shape[1]:
            self._grow(self.end + n - self.start)
        for lo, hi, off in _spans(self.end, self.end + n, self.buf.shape[1]):
            self.buf[:, lo:hi] = block[:, off:off + hi - lo]
        self.end += n

    def read_into(self, out: np.ndarray, a: int) -> None:
        """out[:, i] = input position a + i, zero outside what is held."""
        b = a + out.shape[1]
        lo, hi = max(a, self.start), min(b, self.end)
        if hi <= lo:
            out.fill(0)
            return
        out[:, :lo - a] = 0
        out[:, hi - a:] = 0
        for rlo, rhi, off in _spans(lo, hi, self.buf.shape[1]):
            out[:, lo - a + off:lo - a + off + rhi - rlo] = self.buf[:, rlo:rhi]

    def drop_before(self, pos: int) -> None:
        self.start = max(self.start, min(pos, self.end))

    def _grow(self, needed: int) -> None:
        held = np.empty((self.buf.shape[0], self.end - self.start), np.float32)
        self.read_into(held, self.start)
        self.buf = np.zeros((self.buf.shape[0], max(needed, 2 * self.buf.shape[1])), np.float32)
        self.end = self.start
        self.append(held)  # back at the same positions, in the larger ring


class _Lane:
    def __init__(self, member: Member, prefix: int, segment_length: int, opts: EngineOptions):
        self.member = member
        self.prefix = prefix  # zeros before the input (the shift trick)
        self.seg = segment_length
        self.stride = int((1 - opts.overlap) * segment_length)
        if self.stride <= 0:
            raise ValueError("overlap leaves no stride")
        self.weight = crossfade_weight(segment_length, opts.transition_power)
        self.valid_full = self._valid(segment_length)
        self.offset = 0  # next chunk's start, lane coordinates
        self.emitted = 0  # lane samples handed to the combiner
        # Weighted sums as rings over lane positions [emitted, emitted + capacity): a batch
        # of chunks reaches (batch - 1) strides plus one segment past the next chunk's start.
        self.capacity = segment_length + (opts.batch_size - 1) * self.stride
        self.acc: torch.Tensor | None = None  # (S, C, capacity)
        self.sumw: torch.Tensor | None = None  # (capacity,)
        self.done = False
        self.chunks_done = 0

    def _valid(self, chunk_length: int) -> int:
        if self.member.pad_to_segment:
            return self.seg
        return int(self.member.valid_length(chunk_length))

    def window(self, total: int | None, available: int) -> tuple[int, int, int] | None:
        """(start, valid, chunk_length) of the next chunk in lane coordinates, or None if the
        input needed for it has not been decoded yet. ``total``: input length once known."""
        lane_total = None if total is None else total + self.prefix
        if lane_total is not None:
            if self.offset >= lane_total:
                return None
            chunk = min(self.seg, lane_total - self.offset)
        else:
            chunk = self.seg
        valid = self._valid(chunk) if chunk != self.seg else self.valid_full
        start = self.offset - (valid - chunk) // 2
        if lane_total is None and available + self.prefix < start + valid:
            return None
        return start, valid, chunk

    def lane_total(self, total: int) -> int:
        return total + self.prefix

    def chunks_total(self, total: int) -> int:
        return -(-self.lane_total(total) // self.stride)


class Separator:
    """Streams (C, n) float32 blocks through a LoadedModel; yields (S, C, n) float32 blocks."""

    def __init__(self, model: LoadedModel, opts: EngineOptions | None = None):
        self.model = model
        self.opts = opts or EngineOptions()
        o = self.opts
        if not 0 <= o.overlap < 1:
            raise ValueError("overlap must be in [0, 1)")
        rng = random.Random(o.seed)
        max_shift = int(0.5 * model.samplerate)
        offsets = iter(o.shift_offsets or [])
        self.lanes: list[_Lane] = []
        self.coefs: list[torch.Tensor] = []  # per lane, per source: bag weight / shifts
        nsrc = len(model.sources)
        totals = [sum(m.weights[k] for m in model.members) for k in range(nsrc)]
        for member in model.members:
            seg = member.segment_length
            if o.segment is not None:
                seg = int(o.segment * model.samplerate)
            for _ in range(max(1, o.shifts)):
                prefix = 0
                if o.shifts:
                    offset = next(offsets, None)
                    if offset is None:
                        offset = rng.randint(0, max_shift)
                    prefix = max_shift - offset
                self.lanes.append(_Lane(member, prefix, seg, o))
                coef = [member.weights[k] / totals[k] / max(1, o.shifts) for k in range(nsrc)]
                self.coefs.append(torch.tensor(coef, dtype=torch.float32).view(nsrc, 1, 1))

    # -- public -------------------------------------------------------------------------------
    def run(
        self,
        blocks: Iterable[np.ndarray],
        *,
        expected_samples: int | None = None,
        progress: ProgressFn | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[np.ndarray]:
        channels = self.model.audio_channels
        source = iter(blocks)
        # What lanes still need: about two windows each, the shift spread and a decoded block.
        rate = self.model.samplerate
        ring = _InputRing(channels, max(2 * la.valid_full + la.prefix for la in self.lanes)
                          + 10 * rate)
        chunk_bufs: dict[tuple[int, int], np.ndarray] = {}  # (batch, valid) -> reused input
        total: int | None = None
        lane_out: list[list[torch.Tensor]] = [[] for _ in self.lanes]  # input coordinates
        lane_pos = [0] * len(self.lanes)  # input samples each lane has delivered
        combined_pos = 0

        def total_chunks() -> int:
            seen = ring.end
            n = total if total is not None else max(expected_samples or 0, seen)
            return sum(lane.chunks_total(n) for lane in self.lanes)

        while True:
            if should_stop is not None and should_stop():
                raise Cancelled("the job was cancelled")
            available = ring.end
            batch = self._next_batch(total, available)
            if batch is None:
                if total is None:
                    block = next(source, None)
                    if block is None:
                        total = available
                    else:
                        if block.shape[0] != channels:
                            raise ValueError(f"expected {channels} channels, got {block.shape[0]}")
                        ring.append(block.astype(np.float32, copy=False))
                        del block  # see _InputRing: nothing but the rings outlives a chunk
                    continue
                break  # every lane is done
            lane_idx, windows = batch
            lane = self.lanes[lane_idx]
            valid = windows[0][1]
            xbuf = chunk_bufs.get((len(windows), valid))
            if xbuf is None:
                xbuf = chunk_bufs[(len(windows), valid)] = np.empty(
                    (len(windows), channels, valid), np.float32)
            for row, (start, _, _) in zip(xbuf, windows, strict=True):
                ring.read_into(row, start - lane.prefix)  # zeros outside the track
            x = torch.from_numpy(xbuf)
            out = self._forward(lane.member, x)
            for (_, valid, chunk), y in zip(windows, out, strict=True):
                trim = (valid - chunk) // 2
                self._accumulate(lane, y[..., trim:trim + chunk], chunk)
                lane.offset += lane.stride
                lane.chunks_done += 1
            del out, x, y
            finished = self._finish(lane, total)
            if finished is not None:
                lane_out[lane_idx].append(finished)
                lane_pos[lane_idx] += finished.shape[-1]
                del finished
            if progress is not None:
                progress(sum(la.chunks_done for la in self.lanes), total_chunks())
            # Combine what every lane has finished, and drop input no lane needs any more.
            ready = min(lane_pos)
            if ready > combined_pos:
                yield self._combine(lane_out, ready - combined_pos)
                combined_pos = ready
            ring.drop_before(min(la.offset - la.valid_full - la.prefix for la in self.lanes))

    # -- internals ----------------------------------------------------------------------------
    def _next_batch(
        self, total: int | None, available: int
    ) -> tuple[int, list[tuple[int, int, int]]] | None:
        """The lane furthest behind that can run, with up to batch_size of its chunks."""
        order = sorted(
            (i for i, la in enumerate(self.lanes) if not la.done),
            key=lambda i: self.lanes[i].offset - self.lanes[i].prefix,
        )
        for i in order:
            lane = self.lanes[i]
            first = lane.window(total, available)
            if first is None:
                continue
            windows = [first]
            saved = lane.offset
            while len(windows) < self.opts.batch_size:
                lane.offset += lane.stride
                nxt = lane.window(total, available)
                if nxt is None or nxt[1] != first[1]:
                    break
                windows.append(nxt)
            lane.offset = saved
            return i, windows
        return None

    def _forward(self, member: Member, x: torch.Tensor) -> torch.Tensor:
        device = self.model.device
        dtype = self.opts.autocast_dtype or self.model.autocast_dtype
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(fastpath and not self.opts.sdpa_attention)
        try:
            with torch.inference_mode(), autocast:
                y = member.forward(x.to(device))
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        return y.float().cpu()

    @staticmethod
    def _accumulate(lane: _Lane, y: torch.Tensor, chunk: int) -> None:
        if lane.acc is None:
            lane.acc = torch.zeros(*y.shape[:-1], lane.capacity)
            lane.sumw = torch.zeros(lane.capacity)
        assert lane.sumw is not None and lane.offset + chunk - lane.emitted <= lane.capacity
        for lo, hi, off in _spans(lane.offset, lane.offset + chunk, lane.capacity):
            w = lane.weight[off:off + hi - lo]
            lane.acc[..., lo:hi] += w * y[..., off:off + hi - lo]
            lane.sumw[lo:hi] += w

    @staticmethod
    def _finish(lane: _Lane, total: int | None) -> torch.Tensor | None:
        """Samples no later chunk can touch, normalised and mapped to input coordinates."""
        if total is not None and lane.offset >= lane.lane_total(total):
            end = lane.lane_total(total)
            lane.done = True
        else:
            end = lane.offset  # the next chunk starts here
        if end <= lane.emitted or lane.acc is None or lane.sumw is None:
            return None
        out = torch.empty(*lane.acc.shape[:-1], end - lane.emitted)
        for lo, hi, off in _spans(lane.emitted, end, lane.capacity):
            torch.div(lane.acc[..., lo:hi], lane.sumw[lo:hi], out=out[..., off:off + hi - lo])
            lane.acc[..., lo:hi] = 0  # the slots are reused for later positions
            lane.sumw[lo:hi] = 0
        skip = max(0, lane.prefix - lane.emitted)  # shift trick: drop the zero prefix
        lane.emitted = end
        return out[..., skip:] if skip < out.shape[-1] else None

    def _combine(self, lane_out: list[list[torch.Tensor]], n: int) -> np.ndarray:
        mix: torch.Tensor | None = None
        for i, parts in enumerate(lane_out):
            joined = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
            head, rest = joined[..., :n], joined[..., n:]
            lane_out[i] = [rest] if rest.shape[-1] else []
            term = self.coefs[i] * head
            mix = term if mix is None else mix + term
        assert mix is not None
        return mix.numpy()


def separate_array(
    model: LoadedModel, mix: np.ndarray, opts: EngineOptions | None = None, block: int = 220500
) -> np.ndarray:
    """Whole-array convenience (tests, small clips): (C, n) -> (S, C, n)."""
    blocks = (mix[:, i:i + block] for i in range(0, mix.shape[1], block))
    parts = list(Separator(model, opts).run(blocks, expected_samples=mix.shape[1]))
    return np.concatenate(parts, axis=-1)
