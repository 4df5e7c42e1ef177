"""Decode any common audio (or the audio track of a video) with PyAV, in blocks.

Blocks come out at the model's rate and channel count, so memory does not grow with the
input's length. The total is exactly ``round(native_samples * rate / native_rate)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from handler.errors import UnsupportedAudio

log = logging.getLogger(__name__)

# Small blocks (88 KB of stereo float32 at 44.1 kHz): under tcmalloc's 256 KB large-object
# threshold, so decoding never carves pages out of the free runs that the network's
# activations reuse chunk after chunk (with 5 s blocks the heap fragmented and RSS stepped up).
BLOCK_SECONDS = 0.25


@dataclass
class AudioInfo:
    codec: str
    container: str
    sample_rate: int
    channels: int
    duration_s: float  # from the container; refined by the decoder's count
    bit_depth: int | None = None


@dataclass
class DecodeStats:
    """Filled while decoding: what was really read."""

    native_samples: int = 0
    samples_out: int = 0
    truncated: bool = False
    warnings: list[str] = field(default_factory=list)


def probe(path: Path) -> AudioInfo:
    """Open the file and describe its first audio stream, or raise UnsupportedAudio."""
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = _audio_stream(container)
            ctx = stream.codec_context
            duration = 0.0
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            return AudioInfo(
                codec=ctx.name,
                container=container.format.name,
                sample_rate=int(ctx.sample_rate or 0),
                channels=int(ctx.channels or 0),
                duration_s=max(0.0, duration),
                bit_depth=getattr(ctx.format, "bits", None),
            )
    except UnsupportedAudio:
        raise
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise UnsupportedAudio(f"not a decodable audio or video file ({_reason(exc)})") from None


def _audio_stream(container: av.container.InputContainer) -> av.AudioStream:
    if not container.streams.audio:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        raise UnsupportedAudio(f"the file has no audio track (found: {', '.join(kinds)})")
    stream = container.streams.audio[0]
    if not stream.codec_context.sample_rate:
        raise UnsupportedAudio("the audio track has no sample rate")
    return stream


def _reason(exc: BaseException) -> str:
    # FFmpeg messages name the path; keep only the reason.
    text = getattr(exc, "strerror", None) or str(exc)
    return text.split(":")[0].strip() or type(exc).__name__


def iter_blocks(
    path: Path,
    *,
    rate: int,
    channels: int,
    stats: DecodeStats | None = None,
    block_seconds: float = BLOCK_SECONDS,
) -> Iterator[np.ndarray]:
    """Yield float32 blocks of shape (channels, n) at ``rate``.

    Mono is repeated to stereo (as demucs does), multichannel is downmixed by libswresample.
    A stream that breaks off mid-way (truncated file) yields what decoded and sets
    ``stats.truncated``; a file with no decodable audio raises UnsupportedAudio.
    """
    stats = stats if stats is not None else DecodeStats()
    block = max(1, int(block_seconds * rate))
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise UnsupportedAudio(f"not a decodable audio or video file ({_reason(exc)})") from None
    with container:
        stream = _audio_stream(container)
        native_rate = int(stream.codec_context.sample_rate)
        native_channels = int(stream.codec_context.channels or 0)
        layout = "mono" if native_channels == 1 or channels == 1 else "stereo"
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        pending: list[np.ndarray] = []
        pending_len = 0

        def frames() -> Iterator[av.AudioFrame | None]:
            try:
                for packet in container.demux(stream):
                    for frame in packet.decode():
                        stats.native_samples += frame.samples
                        yield frame
            except (av.FFmpegError, ValueError) as exc:
                if stats.native_samples == 0:
                    raise UnsupportedAudio(f"no decodable audio ({_reason(exc)})") from None
                stats.truncated = True
                stats.warnings.append(
                    f"input is damaged or truncated: decoding stopped after "
                    f"{stats.native_samples / native_rate:.2f} s; that part was separated"
                )
                log.warning("decode stopped early: %s", _reason(exc))
            yield None  # flush the resampler

        for frame in frames():
            for out in resampler.resample(frame):
                data = out.to_ndarray()
                if data.ndim == 1:
                    data = data[None, :]
                pending.append(data.astype(np.float32, copy=False))
                pending_len += data.shape[1]
            while pending_len >= block:
                data = np.concatenate(pending, axis=1)
                yield from _emit(data[:, :block], stats, None, channels)
                pending = [data[:, block:].copy()]  # a view would pin all of `data`
                pending_len = pending[0].shape[1]

        if stats.native_samples == 0:
            raise UnsupportedAudio("the audio track is empty")
        # FFmpeg reads a cut-off file to a clean EOF: compare with the declared duration (the
        # stream's, else the container's). Small gaps (encoder padding, estimates) are ignored.
        if stream.duration and stream.time_base:
            declared = float(stream.duration * stream.time_base)
        elif container.duration:
            declared = container.duration / av.time_base
        else:
            declared = 0.0
        decoded_s = stats.native_samples / native_rate
        if not stats.truncated and decoded_s < declared - max(0.5, 0.02 * declared):
            stats.truncated = True
            stats.warnings.append(
                f"input is damaged or truncated: it declares {declared:.2f} s but decoding "
                f"stopped after {decoded_s:.2f} s; that part was separated"
            )
        expected = round(stats.native_samples * rate / native_rate)
        if pending_len:
            yield from _emit(np.concatenate(pending, axis=1), stats, expected, channels)
        if stats.samples_out < expected:  # the resampler's filter can come up a few short
            pad = np.zeros((channels, expected - stats.samples_out), np.float32)
            yield from _emit(pad, stats, expected, channels)


def _emit(
    data: np.ndarray, stats: DecodeStats, limit: int | None, channels: int
) -> Iterator[np.ndarray]:
    if limit is not None:
        data = data[:, : max(0, limit - stats.samples_out)]
    if data.shape[1] == 0:
        return
    if data.shape[0] != channels:
        data = np.repeat(data[:1], channels, axis=0) if data.shape[0] == 1 else data[:channels]
    stats.samples_out += data.shape[1]
    yield np.ascontiguousarray(data, dtype=np.float32)
