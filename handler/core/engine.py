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

from handler.core.chunking import DONE, ChunkRule, ChunkSettings, Window
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
    num_overlap: int | None = None  # MSST families: chunks covering a sample; None = the YAML's


ProgressFn = Callable[[int, int], None]


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
    """One (member, shift): its chunking rule and its weighted sums, as rings over lane
    positions [emitted, emitted + span)."""

    def __init__(self, member: Member, rule: ChunkRule):
        self.member = member
        self.rule = rule
        self.prefix = rule.prefix
        self.k = 0  # next chunk
        self.emitted = 0  # lane positions handed on, normalised
        self.capacity = rule.span
        self.acc: torch.Tensor | None = None  # (S, C, capacity)
        self.sumw: torch.Tensor | None = None  # (capacity,)
        self.done = False

    def __getattr__(self, name: str):  # a lane reads as its rule (seg, stride, ...)
        return getattr(self.__dict__["rule"], name)

    def next_windows(self, total: int | None, available: int, batch: int) -> list[Window] | None:
        """Up to ``batch`` consecutive windows of one input length, or None if the next one
        cannot run yet (or the lane is done)."""
        windows: list[Window] = []
        while len(windows) < batch:
            w = self.rule.window(self.k + len(windows), total, available)
            if not isinstance(w, Window) or (windows and w.read_len != windows[0].read_len):
                break
            windows.append(w)
        return windows or None

    def accumulate(self, w: Window, y: torch.Tensor) -> None:
        if self.acc is None:
            self.acc = torch.zeros(*y.shape[:-1], self.capacity)
            self.sumw = torch.zeros(self.capacity)
        assert self.sumw is not None and w.out_start >= self.emitted
        assert w.out_start + w.out_len - self.emitted <= self.capacity
        for lo, hi, off in _spans(w.out_start, w.out_start + w.out_len, self.capacity):
            wt = w.weight[off:off + hi - lo]
            self.acc[..., lo:hi] += wt * y[..., w.trim + off:w.trim + off + hi - lo]
            self.sumw[lo:hi] += wt
        self.k += 1

    def finish(self, total: int | None, available: int, n: int | None) -> torch.Tensor | None:
        """Samples no later chunk can touch, normalised, as input samples from where the last
        call stopped (lane positions [prefix, prefix + n))."""
        if total is not None and self.rule.window(self.k, total, available) is DONE:
            self.done = True
            end = total
        else:
            end = self.rule.safe_end(self.k, total, available)
        if end <= self.emitted or self.acc is None or self.sumw is None:
            return None
        out = torch.empty(*self.acc.shape[:-1], end - self.emitted)
        norm = self.rule.norm
        for lo, hi, off in _spans(self.emitted, end, self.capacity):
            part = out[..., off:off + hi - lo]
            if norm is None:
                torch.div(self.acc[..., lo:hi], self.sumw[lo:hi], out=part)
            else:
                torch.div(self.acc[..., lo:hi], norm, out=part)
            self.acc[..., lo:hi] = 0  # the slots are reused for later positions
            self.sumw[lo:hi] = 0
        first, stop = self.emitted, end
        self.emitted = end
        lo = max(0, self.prefix - first)  # the zeros in front are not the track
        hi = stop - first if n is None else min(stop, self.prefix + n) - first
        return out[..., lo:hi] if hi > lo else None

    def read_floor(self, total: int | None, available: int) -> int:
        """Input samples below this are never read again by this lane."""
        return self.rule.read_floor(self.k, total, available) - self.prefix

    def chunks_total(self, n: int) -> int:
        return self.rule.chunks_total(self.rule.lane_total(n))


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
                settings = ChunkSettings(seg, o.overlap, o.transition_power, prefix, o.batch_size,
                                         o.num_overlap)
                self.lanes.append(_Lane(member, member.chunking(settings)))
                coef = [member.weights[k] / totals[k] / max(1, o.shifts) for k in range(nsrc)]
                self.coefs.append(torch.tensor(coef, dtype=torch.float32).view(nsrc, 1, 1))

    # -- public -------------------------------------------------------------------------------
    def work_seconds(self, n: int) -> float:
        """Seconds of audio the networks will process for an ``n``-sample input (every lane's
        windows, context and padding included), per member of the model: the job's cost in
        units of one network pass over one second of audio."""
        total = 0
        for lane in self.lanes:
            lane_total = lane.rule.lane_total(n)
            first = lane.rule.window(0, lane_total, lane_total)
            if isinstance(first, Window):
                # A network that only runs on its training window pads every chunk to it.
                cost = max(first.read_len,
                           lane.member.segment_length if lane.member.pad_to_segment else 0)
                total += lane.rule.chunks_total(lane_total) * cost
        return total / self.model.samplerate / len(self.model.members)

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
        ring = _InputRing(channels, max(2 * la.capacity + la.prefix for la in self.lanes)
                          + 10 * rate)
        chunk_bufs: dict[tuple[int, int], np.ndarray] = {}  # (batch, length) -> reused input
        n: int | None = None  # input length, once decoded to the end
        lane_out: list[list[torch.Tensor]] = [[] for _ in self.lanes]  # input coordinates
        lane_pos = [0] * len(self.lanes)  # input samples each lane has delivered
        combined_pos = 0

        while True:
            if should_stop is not None and should_stop():
                raise Cancelled("the job was cancelled")
            picked = self._next_batch(n, ring.end)
            if picked is None:
                if n is None:
                    block = next(source, None)
                    if block is None:
                        n = ring.end
                    else:
                        if block.shape[0] != channels:
                            raise ValueError(f"expected {channels} channels, got {block.shape[0]}")
                        ring.append(block.astype(np.float32, copy=False))
                        del block  # see _InputRing: nothing but the rings outlives a chunk
                    continue
                # Nothing left to run: a lane whose last chunk ran before the input's end was
                # known finishes now.
                for i in range(len(self.lanes)):
                    self._collect(i, n, ring.end, lane_out, lane_pos)
                if min(lane_pos) > combined_pos:
                    yield self._combine(lane_out, min(lane_pos) - combined_pos)
                break
            lane_idx, windows = picked
            lane = self.lanes[lane_idx]
            x = torch.from_numpy(self._gather(ring, lane, windows, chunk_bufs))
            out = self._forward(lane.member, x)
            for w, y in zip(windows, out, strict=True):
                lane.accumulate(w, y)
            del out, x, y
            self._collect(lane_idx, n, ring.end, lane_out, lane_pos)
            if progress is not None:
                seen = n if n is not None else max(expected_samples or 0, ring.end)
                progress(sum(la.k for la in self.lanes),
                         sum(la.chunks_total(seen) for la in self.lanes))
            # Combine what every lane has finished, and drop input no lane needs any more.
            ready = min(lane_pos)
            if ready > combined_pos:
                yield self._combine(lane_out, ready - combined_pos)
                combined_pos = ready
            ring.drop_before(min(la.read_floor(*self._lane_extent(la, n, ring.end))
                                 for la in self.lanes))

    # -- internals ----------------------------------------------------------------------------
    def _collect(self, i: int, n: int | None, decoded: int,
                 lane_out: list[list[torch.Tensor]], lane_pos: list[int]) -> None:
        """Move what lane ``i`` has finished to its output queue."""
        lane = self.lanes[i]
        if lane.done:
            return
        finished = lane.finish(*self._lane_extent(lane, n, decoded), n)
        if finished is not None:
            lane_out[i].append(finished)
            lane_pos[i] += finished.shape[-1]

    @staticmethod
    def _lane_extent(lane: _Lane, n: int | None, decoded: int) -> tuple[int | None, int]:
        """(lane total once the input length is known, lane positions decoded so far)."""
        return (None if n is None else lane.rule.lane_total(n)), decoded + lane.prefix

    def _next_batch(self, n: int | None, decoded: int) -> tuple[int, list[Window]] | None:
        """The lane furthest behind that can run, with up to batch_size of its windows."""
        extents = [self._lane_extent(la, n, decoded) for la in self.lanes]
        order = sorted(
            (i for i, la in enumerate(self.lanes) if not la.done),
            key=lambda i: self.lanes[i].rule.safe_end(self.lanes[i].k, *extents[i])
            - self.lanes[i].prefix,
        )
        for i in order:
            windows = self.lanes[i].next_windows(*extents[i], self.opts.batch_size)
            if windows is not None:
                return i, windows
        return None

    @staticmethod
    def _gather(ring: _InputRing, lane: _Lane, windows: list[Window],
                bufs: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
        """The windows' input (zeros outside the track) in a buffer reused chunk after chunk."""
        length = windows[0].read_len
        buf = bufs.get((len(windows), length))
        if buf is None:
            buf = bufs[(len(windows), length)] = np.empty(
                (len(windows), ring.buf.shape[0], length), np.float32)
        for row, w in zip(buf, windows, strict=True):
            ring.read_into(row, w.read_start - lane.prefix)
        return buf

    def _forward(self, member: Member, x: torch.Tensor) -> torch.Tensor:
        device = self.model.device
        dtype = self.opts.autocast_dtype or self.model.autocast_dtype
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
        with torch.inference_mode(), autocast:
            y = member.forward(x.to(device))
        return y.float().cpu()

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
