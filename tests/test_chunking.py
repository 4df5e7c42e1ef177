"""The engine's chunking-rule mechanism, independent of any model family: rules with zero
padding in front and behind, a flush-with-the-end last chunk, a constant normaliser, and a
scale-by-position network whose exact chunked output is known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from handler.core.chunking import DONE, ChunkSettings, DemucsChunking, Window
from handler.core.engine import EngineOptions, Separator
from handler.core.models.base import LoadedModel, Member

pytestmark = pytest.mark.unit


class PaddedHann:
    """UVR-MDX-style: ``pad`` zeros in front, the lane padded to a whole number of steps,
    Hann-weighted windows (zero at both ends) normalised by the summed weights."""

    norm = None

    def __init__(self, chunk: int, step: int, pad: int):
        self.chunk, self.step, self.prefix = chunk, step, pad
        self.span = chunk

    def lane_total(self, n: int) -> int:
        return self.prefix + n + self.prefix + (-(self.prefix + n)) % self.step

    def window(self, k, total, available):
        start = k * self.step
        if total is not None and start >= total:
            return DONE
        length = self.chunk if total is None else min(self.chunk, total - start)
        if total is None and available < start + self.chunk:
            return None
        weight = torch.from_numpy(np.hanning(length).astype(np.float32))
        return Window(start, self.chunk, start, length, 0, weight)

    def safe_end(self, k, total, available):
        return total if total is not None and k * self.step >= total else k * self.step

    def read_floor(self, k, total, available):
        return k * self.step

    def chunks_total(self, total):
        return -(-total // self.step)


class FlushEnd:
    """MSST-RoFormer-style: chunks every ``step`` with no padding, the last one flush with the
    end (it may start before the previous chunk's end), a constant-weight window."""

    prefix = 0
    norm = None

    def __init__(self, chunk: int, step: int):
        self.chunk, self.step = chunk, step
        self.span = 2 * chunk

    def lane_total(self, n):
        return n

    def _start(self, k, total):
        start = k * self.step
        return start if start + self.chunk <= total else max(0, total - self.chunk)

    def window(self, k, total, available):
        if total is None:
            if available < k * self.step + self.chunk:
                return None
            return Window(k * self.step, self.chunk, k * self.step, self.chunk, 0,
                          torch.ones(self.chunk))
        if k * self.step >= total or (k and (k - 1) * self.step + self.chunk >= total):
            return DONE
        start = self._start(k, total)
        length = min(self.chunk, total)
        return Window(start, length, start, length, 0, torch.ones(length))

    def safe_end(self, k, total, available):
        if total is None:  # a flush chunk may still start at (input end - chunk)
            return max(0, min(k * self.step, available - self.chunk))
        if self.window(k, total, available) is DONE:
            return total
        return min(k * self.step, self._start(k, total))

    def read_floor(self, k, total, available):
        return self.safe_end(k, total, available)

    def chunks_total(self, total):
        return max(1, -(-max(0, total - self.chunk) // self.step) + 1)


class SumOverCount(PaddedHann):
    """MDX23C-style: constant weights, divided by the (constant) number of overlaps."""

    def __init__(self, chunk: int, overlaps: int):
        super().__init__(chunk, chunk // overlaps, chunk - chunk // overlaps)
        self.norm = float(overlaps)

    def lane_total(self, n):
        return self.prefix + n + self.prefix + (-(n)) % self.step

    def window(self, k, total, available):
        w = super().window(k, total, available)
        if isinstance(w, Window):
            w.weight = torch.ones(w.out_len)
        return w


def position_net(x: torch.Tensor) -> torch.Tensor:
    """A pointwise network: (B, C, T) -> (B, 2, C, T) = [2x, -x]. A pointwise network's
    normalised overlap-add reproduces it exactly wherever the weights cover the position."""
    return torch.stack([2 * x, -x], 1)


def model_with(rule_factory) -> LoadedModel:
    member = Member(forward=position_net, segment_length=1000, valid_length=lambda n: n,
                    weights=[1.0, 1.0], chunker=lambda m, s: rule_factory())
    return LoadedModel("rules", ["a", "b"], 1000, 2, [member])


def stream(model: LoadedModel, mix: np.ndarray, block: int, batch: int = 1) -> np.ndarray:
    opts = EngineOptions(shifts=0, batch_size=batch)
    blocks = (mix[:, i:i + block] for i in range(0, mix.shape[1], block))
    return np.concatenate(list(Separator(model, opts).run(blocks)), -1)


@pytest.mark.parametrize("n", [1, 999, 1000, 4321, 10_000])
@pytest.mark.parametrize("rule", ["padded_hann", "flush_end", "sum_over_count"])
@pytest.mark.parametrize("block", [250, 3000])
def test_rules_reproduce_a_pointwise_network(rule: str, n: int, block: int) -> None:
    factories = {
        "padded_hann": lambda: PaddedHann(chunk=1000, step=750, pad=200),
        "flush_end": lambda: FlushEnd(chunk=1000, step=500),
        "sum_over_count": lambda: SumOverCount(chunk=1000, overlaps=4),
    }
    if rule == "flush_end" and n < 1000:
        pytest.skip("a flush chunk needs a track at least one chunk long")
    mix = np.random.default_rng(n).standard_normal((2, n)).astype(np.float32)
    out = stream(model_with(factories[rule]), mix, block)
    assert out.shape == (2, 2, n)
    np.testing.assert_allclose(out[0], 2 * mix, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], -mix, rtol=1e-5, atol=1e-5)


def test_batches_give_the_same_output() -> None:
    mix = np.random.default_rng(1).standard_normal((2, 7777)).astype(np.float32)
    model = model_with(lambda: PaddedHann(chunk=1000, step=750, pad=200))
    np.testing.assert_array_equal(stream(model, mix, 500, batch=1), stream(model, mix, 500, 3))


def test_demucs_rule_windows() -> None:
    """demucs's arithmetic: chunks every (1 - overlap) * segment, centred in the network's
    valid length, the last one shorter, triangle weights cut to the chunk."""
    rule = DemucsChunking(ChunkSettings(segment=100, overlap=0.25, shift_prefix=7),
                          valid_length=lambda n: n + 10, pad_to_segment=False)
    assert (rule.stride, rule.prefix, rule.lane_total(200)) == (75, 7, 207)
    w = rule.window(1, None, 10_000)
    assert (w.read_start, w.read_len, w.out_start, w.out_len, w.trim) == (70, 110, 75, 100, 5)
    last = rule.window(2, 207, 207)
    assert (last.out_start, last.out_len, last.read_len) == (150, 57, 67)
    torch.testing.assert_close(last.weight, rule.weight[:57])
    assert rule.window(3, 207, 207) is DONE
    assert rule.window(1, None, 179) is None  # needs input up to 70 + 110
    assert rule.chunks_total(207) == 3
