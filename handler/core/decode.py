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

# Header values outside these bounds are refused (check_stream_params): 768 kHz is the
# highest rate real converters offer; 64 channels covers polyWAV field recorders and
# ambisonics up to 7th order with room to spare.
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 768_000
MAX_CHANNELS = 64

# FFmpeg demuxers of audio/video files (names as FFmpeg spells them; a demuxer with several
# names matches on any). Everything else is refused: concat/ffconcat, hls, dash and other
# playlists open further files or URLs (a 44-byte ffconcat list naming itself made FFmpeg
# recurse until the thread's stack overflowed), image sequences and *_pipe demuxers are
# images, and devices, subtitles and raw streams are not songs.
ACCEPTED_FORMATS = (
    "wav", "w64", "aiff", "caf", "au", "sox", "voc", "ircam", "nistsphere", "iff",
    "flac", "mp3", "aac", "loas", "ac3", "eac3", "dts", "dtshd", "truehd", "mlp",
    "ogg", "ape", "wv", "tta", "tak", "mpc", "mpc8", "shn", "dsf", "oma", "amr", "xwma",
    "mov", "matroska", "asf", "avi", "flv", "mpegts", "mpeg", "nut",
)
_OPEN_OPTIONS = {"format_whitelist": ",".join(ACCEPTED_FORMATS), "protocol_whitelist": "file"}


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
        with open_input(path) as container:
            stream = _audio_stream(container)
            ctx = stream.codec_context
            check_stream_params(int(ctx.sample_rate or 0), int(ctx.channels or 0))
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


def open_input(path: Path) -> av.container.InputContainer:
    """Open ``path`` with an accepted demuxer and the ``file`` protocol only.

    The whitelist is checked after FFmpeg's format probe (which only reads bytes) and before
    the demuxer reads its header, so a refused format never opens anything. Nested opens by
    an accepted demuxer are held to ``file`` too (FFmpeg copies the whitelists).
    """
    try:
        return av.open(f"file:{Path(path).resolve()}", container_options=dict(_OPEN_OPTIONS),
                       metadata_errors="ignore")
    except av.ArgumentError:  # EINVAL: "Format not on whitelist" (or a protocol refused)
        raise UnsupportedAudio(
            "the file is not an accepted audio or video container (playlists, concat lists, "
            "image sequences and other formats that read further files are refused)"
        ) from None
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise UnsupportedAudio(f"not a decodable audio or video file ({_reason(exc)})") from None


def check_stream_params(sample_rate: int, channels: int) -> None:
    """Refuse header values no real recording has, before a resampler is built for them: a
    8 KB WAV claiming 1 GHz made libswresample allocate ~1.2 GB and work for 30 s."""
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise UnsupportedAudio(
            f"the audio track claims a sample rate of {sample_rate} Hz; accepted: "
            f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
        )
    # 0: not in the header (some codecs say only when decoding); each frame is checked too.
    if channels < 0 or channels > MAX_CHANNELS:
        raise UnsupportedAudio(
            f"the audio track has {channels} channels; accepted: 1-{MAX_CHANNELS}"
        )


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

    Mono is repeated to stereo (as demucs does), multichannel is downmixed by libswresample,
    or mixed equally to mono here where FFmpeg has no layout for the channel count (9, 11,
    13 ... channels). A stream that changes rate or layout midway gets a fresh resampler.
    A stream that breaks off mid-way (truncated file) yields what decoded and sets
    ``stats.truncated``; a file with no decodable audio raises UnsupportedAudio.
    """
    stats = stats if stats is not None else DecodeStats()
    block = max(1, int(block_seconds * rate))
    container = open_input(path)
    with container:
        stream = _audio_stream(container)
        native_rate = int(stream.codec_context.sample_rate)
        native_channels = int(stream.codec_context.channels or 0)
        check_stream_params(native_rate, native_channels)
        converter = _Converter(rate, channels)
        pending: list[np.ndarray] = []
        pending_len = 0
        decoded_s = 0.0  # native seconds (the rate may change midway)
        expected_f = 0.0  # output samples the decoded audio is worth

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
                    f"{decoded_s:.2f} s; that part was separated"
                )
                log.warning("decode stopped early: %s", _reason(exc))
            yield None  # flush the resampler

        for frame in frames():
            if frame is not None and frame.samples:
                decoded_s += frame.samples / frame.sample_rate
                expected_f += frame.samples * rate / frame.sample_rate
            for data in converter.convert(frame):
                pending.append(data)
                pending_len += data.shape[1]
            while pending_len >= block:
                data = np.concatenate(pending, axis=1)
                yield from _emit(data[:, :block], stats, None, channels)
                pending = [data[:, block:].copy()]  # a view would pin all of `data`
                pending_len = pending[0].shape[1]

        if stats.native_samples == 0:
            raise UnsupportedAudio("the audio track is empty")
        expected = round(expected_f)
        if expected == 0:  # e.g. 5 samples at 768 kHz: nothing at the model's rate
            raise UnsupportedAudio(
                f"the audio track is too short: {stats.native_samples} samples "
                f"({decoded_s * 1000:.3f} ms) decode to no sample at {rate} Hz"
            )
        # FFmpeg reads a cut-off file to a clean EOF: compare with the declared duration (the
        # stream's, else the container's). Small gaps (encoder padding, estimates) are ignored.
        if stream.duration and stream.time_base:
            declared = float(stream.duration * stream.time_base)
        elif container.duration:
            declared = container.duration / av.time_base
        else:
            declared = 0.0
        if not stats.truncated and decoded_s < declared - max(0.5, 0.02 * declared):
            stats.truncated = True
            stats.warnings.append(
                f"input is damaged or truncated: it declares {declared:.2f} s but decoding "
                f"stopped after {decoded_s:.2f} s; that part was separated"
            )
        if pending_len:
            yield from _emit(np.concatenate(pending, axis=1), stats, expected, channels)
        if stats.samples_out < expected:  # the resampler's filter can come up a few short
            pad = np.zeros((channels, expected - stats.samples_out), np.float32)
            yield from _emit(pad, stats, expected, channels)


class _Converter:
    """Decoded frames (any format, layout, rate) → float32 (channels, n) at ``rate``.

    One libswresample context per run of identical frame parameters; where FFmpeg cannot
    build a downmix (a channel count with no default layout), channels are averaged here.
    """

    def __init__(self, rate: int, channels: int):
        self.rate = rate
        self.channels = channels
        self.key: tuple[str, str, int] | None = None
        self.resampler: av.AudioResampler | None = None
        self.own_mix = False

    def convert(self, frame: av.AudioFrame | None) -> list[np.ndarray]:
        if frame is None:
            return self._flush()
        key = (frame.format.name, frame.layout.name, int(frame.sample_rate))
        if key == self.key:
            return self._run(frame)
        out = self._flush()
        n_in = frame.layout.nb_channels
        check_stream_params(int(frame.sample_rate), n_in)
        if n_in == 0:
            raise UnsupportedAudio("a decoded audio frame has no channels")
        self.key = key
        self.own_mix = False
        self.resampler = self._resampler("mono" if n_in == 1 else None)
        try:
            return out + self._run(frame)
        except av.ArgumentError:
            # libswresample has no matrix for this layout (e.g. "9 channels", no default
            # layout to assume): mix every channel equally to mono ourselves.
            if n_in <= 2:
                raise
            log.info("no FFmpeg downmix for %d channels (%s): mixing them equally",
                     n_in, frame.layout.name)
            self.own_mix = True
            self.resampler = self._resampler("mono")
            return out + self._run(frame)

    def _resampler(self, layout: str | None) -> av.AudioResampler:
        if layout is None:
            layout = "mono" if self.channels == 1 else "stereo"
        return av.AudioResampler(format="fltp", layout=layout, rate=self.rate)

    def _run(self, frame: av.AudioFrame) -> list[np.ndarray]:
        assert self.resampler is not None
        if self.own_mix:
            frame = _mix_to_mono(frame)
        return [self._array(out) for out in self.resampler.resample(frame)]

    def _flush(self) -> list[np.ndarray]:
        if self.resampler is None:
            return []
        out = [self._array(f) for f in self.resampler.resample(None)]
        self.resampler = None
        self.key = None
        return out

    def _array(self, frame: av.AudioFrame) -> np.ndarray:
        data = frame.to_ndarray()
        if data.ndim == 1:
            data = data[None, :]
        data = data.astype(np.float32, copy=False)
        if data.shape[0] != self.channels:  # mono (own mix or mono input) to stereo
            data = np.repeat(data[:1], self.channels, axis=0)
        return data


# Full scale of each integer sample format (unsigned u8 is centred on 128).
_FULL_SCALE = {"u8": 128.0, "s16": 2.0**15, "s32": 2.0**31, "s64": 2.0**63}


def _mix_to_mono(frame: av.AudioFrame) -> av.AudioFrame:
    """The mean of every channel, as a float mono frame at the same rate."""
    n_ch = frame.layout.nb_channels
    data = frame.to_ndarray()
    if not frame.format.is_planar:  # interleaved: (1, n * channels)
        data = data.reshape(-1, n_ch).T
    kind = frame.format.name.rstrip("p")
    mono = data.astype(np.float64).mean(axis=0, keepdims=True)
    if kind == "u8":
        mono -= 128.0
    mono /= _FULL_SCALE.get(kind, 1.0)
    out = av.AudioFrame.from_ndarray(mono.astype(np.float32), format="fltp", layout="mono")
    out.sample_rate = frame.sample_rate
    return out


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
