"""Audio and video files for decode/pipeline tests, written with PyAV (FFmpeg's encoders).

``FORMATS`` names each kind of input the decoder must handle; ``make(name, dir)`` writes it
and returns a ``Made`` with the path and what went in. ``native_decode`` decodes a file with
plain PyAV (no resampling), the independent count the pipeline's decoder is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def chord_signal(seconds: float, rate: int, channels: int, seed: int = 0) -> np.ndarray:
    """(channels, n) float32: a different chord per channel plus a little noise, peak < 0.8."""
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    rng = np.random.default_rng(seed)
    out = np.empty((channels, n), np.float32)
    for c in range(channels):
        base = 220.0 * 2 ** (c / 4)
        tone = sum(np.sin(2 * np.pi * base * k * t + c) / k for k in (1, 2, 3))
        out[c] = 0.35 * tone / 1.84 + 0.02 * rng.standard_normal(n)
    fade = min(n, int(0.01 * rate))  # no click at the ends
    if fade:
        ramp = np.linspace(0, 1, fade, dtype=np.float32)
        out[:, :fade] *= ramp
        out[:, n - fade:] *= ramp[::-1]
    return out


def write_audio(
    path: Path,
    data: np.ndarray,
    rate: int,
    codec: str,
    *,
    container: str | None = None,
    sample_fmt: str | None = None,
    bit_rate: int | None = None,
    options: dict[str, str] | None = None,
) -> Path:
    """Encode (channels, n) float32 ``data`` into ``path`` with FFmpeg's ``codec``."""
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=LAYOUTS[data.shape[0]])
        _setup_audio(stream, sample_fmt, bit_rate, options)
        _encode_audio(out, stream, data, rate)
    return path


def write_video(
    path: Path,
    seconds: float,
    *,
    container: str,
    video_codec: str,
    audio_codec: str | None = None,
    audio_rate: int = 44100,
    audio: np.ndarray | None = None,
    options: dict[str, str] | None = None,
) -> Path:
    """A small moving-picture video (64x48, 10 fps), with an audio track unless
    ``audio_codec`` is None."""
    fps = 10
    with av.open(str(path), "w", format=container) as out:
        vstream = out.add_stream(video_codec, rate=fps)
        vstream.width, vstream.height, vstream.pix_fmt = 64, 48, "yuv420p"
        astream = None
        if audio_codec is not None:
            if audio is None:
                audio = chord_signal(seconds, audio_rate, 2)
            astream = out.add_stream(audio_codec, rate=audio_rate,
                                     layout=LAYOUTS[audio.shape[0]])
            _setup_audio(astream, None, None, options)
        for i in range(int(round(seconds * fps))):
            img = np.zeros((48, 64, 3), np.uint8)
            img[:, (i * 3) % 64] = 255
            img[..., 1] = i * 7 % 256
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in vstream.encode(frame):
                out.mux(packet)
        for packet in vstream.encode(None):
            out.mux(packet)
        if astream is not None:
            assert audio is not None
            _encode_audio(out, astream, audio, audio_rate)
    return path


def _setup_audio(stream, sample_fmt, bit_rate, options) -> None:
    if sample_fmt is not None:
        stream.format = sample_fmt
    if bit_rate is not None:
        stream.bit_rate = bit_rate
    if options:
        stream.codec_context.options = dict(options)


def _encode_audio(out, stream, data: np.ndarray, rate: int) -> None:
    layout = LAYOUTS[data.shape[0]]
    step = 4096
    for start in range(0, data.shape[1], step):
        part = np.ascontiguousarray(data[:, start:start + step], dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(part, format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)


@dataclass
class Made:
    path: Path
    seconds: float  # nominal duration of what went in
    rate: int
    channels: int
    source: np.ndarray | None = None  # the samples encoded (lossless formats compare to it)
    lossless: bool = False


@dataclass
class Spec:
    ext: str
    codec: str | None  # None: a video without audio
    rate: int = 44100
    channels: int = 2
    container: str | None = None
    sample_fmt: str | None = None
    bit_rate: int | None = None
    video: str | None = None  # video codec: the audio is a video's track
    lossless: bool = False
    options: dict[str, str] | None = None


SECONDS = 2.3

FORMATS: dict[str, Spec] = {
    "mp3": Spec("mp3", "libmp3lame", bit_rate=160_000),
    "m4a_aac": Spec("m4a", "aac", container="ipod", bit_rate=128_000),
    "ogg_vorbis": Spec("ogg", "vorbis", options={"strict": "experimental"}),
    "opus": Spec("opus", "libopus", rate=48000, container="ogg", bit_rate=96_000),
    "flac": Spec("flac", "flac", sample_fmt="s16", lossless=True),
    "wav_s16": Spec("wav", "pcm_s16le", lossless=True),
    "wav_s24": Spec("wav", "pcm_s24le", lossless=True),
    "wav_f32": Spec("wav", "pcm_f32le", lossless=True),
    "wav_mono_8k": Spec("wav", "pcm_s16le", rate=8000, channels=1, lossless=True),
    "flac_96k_24bit": Spec("flac", "flac", rate=96000, sample_fmt="s32", lossless=True),
    "wav_5_1": Spec("wav", "pcm_s16le", channels=6, lossless=True),
    "mp4_video_aac": Spec("mp4", "aac", video="libx264", container="mp4"),
    "webm_video_opus": Spec("webm", "libopus", rate=48000, video="libvpx", container="webm"),
}

VIDEO_WITHOUT_AUDIO = Spec("mp4", None, video="libx264", container="mp4")


def make(name: str, directory: Path, seconds: float = SECONDS, spec: Spec | None = None) -> Made:
    spec = spec or (VIDEO_WITHOUT_AUDIO if name == "video_no_audio" else FORMATS[name])
    path = directory / f"{name}.{spec.ext}"
    if spec.codec is None:
        assert spec.video is not None and spec.container is not None
        write_video(path, seconds, container=spec.container, video_codec=spec.video)
        return Made(path, seconds, 0, 0)
    data = chord_signal(seconds, spec.rate, spec.channels, seed=len(name))
    if spec.video is not None:
        assert spec.container is not None
        write_video(path, seconds, container=spec.container, video_codec=spec.video,
                    audio_codec=spec.codec, audio_rate=spec.rate, audio=data,
                    options=spec.options)
    else:
        write_audio(path, data, spec.rate, spec.codec, container=spec.container,
                    sample_fmt=spec.sample_fmt, bit_rate=spec.bit_rate, options=spec.options)
    return Made(path, seconds, spec.rate, spec.channels, data, spec.lossless)


def native_decode(path: Path) -> tuple[np.ndarray, int]:
    """All samples of the first audio track as FFmpeg decodes them, (channels, n) float64 at
    the native rate, with plain PyAV: no resampler, no blocks."""
    parts = []
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        for frame in container.decode(stream):
            data = frame.to_ndarray()
            if frame.format.is_planar:
                parts.append(data.astype(np.float64))
            else:
                parts.append(data.reshape(-1, frame.layout.nb_channels).T.astype(np.float64))
    audio = np.concatenate(parts, axis=1)
    kind = frame.format.name.rstrip("p")
    if kind in ("s16", "s32"):
        audio /= 2.0 ** (15 if kind == "s16" else 31)
    return audio, rate


def random_bytes(path: Path, n: int = 50_000, seed: int = 0) -> Path:
    path.write_bytes(np.random.default_rng(seed).bytes(n))
    return path
