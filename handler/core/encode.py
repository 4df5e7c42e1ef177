"""Incremental encoders: MP3 (lameenc), WAV and FLAC (soundfile).

Writers take (channels, n) float32 blocks as they leave the engine, so nothing waits for the
whole track. Integer outputs (MP3, 16/24-bit WAV/FLAC) clamp each block to [-1, 1] on its own
(no whole-file peak pass); 32-bit float WAV keeps peaks above full scale (demucs's --float32).
MP3 files get a LAME "Info" tag with the encoder delay and padding, so decoders that honour it
(FFmpeg, browsers, most players) return exactly the input's sample count: gapless, no added silence.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import lameenc
import numpy as np
import soundfile as sf

FORMATS = ("mp3", "wav", "flac")
CONTENT_TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav", "flac": "audio/flac"}
# Sample formats of WAV/FLAC output (demucs: default 16-bit, --int24, --float32). FLAC has no
# float samples.
BIT_DEPTHS = ("16", "24", "32f")
_SUBTYPES = {"16": "PCM_16", "24": "PCM_24", "32f": "FLOAT"}
MP3_BITRATES = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_MPEG1_RATES = {44100: 0, 48000: 1, 32000: 2}
_LAME_DELAY = 576  # LAME's encoder delay at these rates (decoders add 529 of their own)
_SAMPLES_PER_FRAME = 1152
MP3_CEILING = 0.98  # -0.18 dBFS


@dataclass
class EncodedFile:
    path: Path
    format: str
    channels: int
    sample_rate: int
    bitrate: int | None  # kbps, MP3 only
    samples: int
    bytes: int

    @property
    def duration_s(self) -> float:
        return self.samples / self.sample_rate

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


class Writer(Protocol):
    def write(self, block: np.ndarray) -> None: ...
    def close(self) -> EncodedFile: ...
    def abort(self) -> None: ...


def _prepare(block: np.ndarray, channels: int, clip: bool = True) -> np.ndarray:
    """(C, n) float -> (n, channels) float32, in [-1, 1] when ``clip``."""
    if channels == 1 and block.shape[0] > 1:
        block = block.mean(axis=0, keepdims=True)
    elif channels == 2 and block.shape[0] == 1:
        block = np.repeat(block, 2, axis=0)
    data = np.clip(block.T, -1.0, 1.0) if clip else block.T
    return data.astype(np.float32, copy=False)


class SoundfileWriter:
    def __init__(self, path: Path, fmt: str, sample_rate: int, channels: int,
                 bit_depth: str = "16"):
        if bit_depth not in BIT_DEPTHS or (fmt == "flac" and bit_depth == "32f"):
            raise ValueError(f"no {bit_depth} samples in {fmt}")
        self.path, self.fmt, self.rate, self.channels = path, fmt, sample_rate, channels
        self.float = bit_depth == "32f"
        self.samples = 0
        self._file = sf.SoundFile(
            str(path), "w", samplerate=sample_rate, channels=channels,
            format=fmt.upper(), subtype=_SUBTYPES[bit_depth],
        )

    def write(self, block: np.ndarray) -> None:
        data = _prepare(block, self.channels, clip=not self.float)
        self._file.write(data)
        self.samples += data.shape[0]

    def close(self) -> EncodedFile:
        self._file.close()
        return EncodedFile(self.path, self.fmt, self.channels, self.rate, None, self.samples,
                           self.path.stat().st_size)

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class Mp3Writer:
    def __init__(self, path: Path, sample_rate: int, channels: int, bitrate: int = 192):
        if bitrate not in MP3_BITRATES:
            raise ValueError(f"mp3 bitrate must be one of {MP3_BITRATES}")
        self.path, self.rate, self.channels, self.bitrate = path, sample_rate, channels, bitrate
        self.samples = 0
        self._enc = lameenc.Encoder()
        self._enc.set_bit_rate(bitrate)
        self._enc.set_in_sample_rate(sample_rate)
        self._enc.set_channels(channels)
        # LAME quality 3: half the encode time of 2 (mono: 0.008 vs 0.015 s per audio second).
        self._enc.set_quality(3)
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()/abort()
        # Reserve the first frame for the Info tag (CBR frame size, no padding bit).
        self._tag_len = 144000 * bitrate // sample_rate if sample_rate in _MPEG1_RATES else 0
        self._file.write(b"\0" * self._tag_len)
        self._frames = 0
        self._carry = b""  # bytes of a frame whose end has not been encoded yet
        self._first_header: bytes | None = None

    def write(self, block: np.ndarray) -> None:
        # A little headroom: the codec's ringing lifts full-scale peaks ~1% on decode.
        data = np.clip(_prepare(block, self.channels), -MP3_CEILING, MP3_CEILING)
        pcm = (data * 32767.0).round().astype("<i2")
        self.samples += data.shape[0]
        self._put(bytes(self._enc.encode(pcm.tobytes())))

    def _put(self, chunk: bytes) -> None:
        self._file.write(chunk)
        # Count whole frames: the Info tag needs the frame count.
        buf = self._carry + chunk
        pos = 0
        while len(buf) - pos >= 4:
            size = _frame_size(buf[pos:pos + 4])
            if size is None:  # not a frame header: give up on counting (no tag then)
                self._tag_len = 0
                break
            if self._first_header is None:
                self._first_header = buf[pos:pos + 4]
            if len(buf) - pos < size:
                break
            pos += size
            self._frames += 1
        self._carry = buf[pos:]

    def close(self) -> EncodedFile:
        if self.samples:  # lameenc refuses to flush an encoder that was never fed
            self._put(bytes(self._enc.flush()))
        if self._tag_len:
            tag = self._info_tag()
            if tag is not None:
                self._file.seek(0)
                self._file.write(tag)
        self._file.close()
        if self._tag_len and self._first_header is None:  # empty stream: drop the reserved frame
            self.path.write_bytes(b"")
        return EncodedFile(self.path, "mp3", self.channels, self.rate, self.bitrate,
                           self.samples, self.path.stat().st_size)

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)

    def _info_tag(self) -> bytes | None:
        if self._first_header is None:
            return None
        end_pad = self._frames * _SAMPLES_PER_FRAME - _LAME_DELAY - self.samples
        if not 0 <= end_pad < 4096:
            return None
        header = bytearray(self._first_header)
        header[2] &= ~0x02  # no padding bit: the frame is exactly _tag_len bytes
        mono = (header[3] >> 6) == 3
        side_info = 17 if mono else 32
        total_bytes = self._file.tell()
        frame = bytearray(self._tag_len)
        frame[0:4] = header
        pos = 4 + side_info
        toc = bytes(i * 256 // 100 for i in range(100))
        xing = b"Info" + struct.pack(">III", 0x0F, self._frames, total_bytes) + toc
        xing += struct.pack(">I", 0)  # quality
        lame = b"LAME3.100" + bytes([0x01, 0])  # tag revision 0, CBR; lowpass unknown
        lame += b"\0" * 8  # replay gain
        lame += bytes([0, min(self.bitrate, 255)])
        delay_pad = (_LAME_DELAY << 12) | end_pad  # two 12-bit fields
        lame += delay_pad.to_bytes(3, "big")
        lame += b"\0" * 4  # misc, mp3 gain, preset/surround
        lame += struct.pack(">I", total_bytes) + b"\0\0"  # music length, music CRC (unset)
        body = xing + lame
        if pos + len(body) + 2 > len(frame):
            return None
        frame[pos:pos + len(body)] = body
        crc_at = pos + len(body)
        frame[crc_at:crc_at + 2] = struct.pack(">H", _crc16(bytes(frame[:crc_at])))
        return bytes(frame)


_BITRATES_L3 = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 0)


def _frame_size(header: bytes) -> int | None:
    """Byte size of an MPEG-1 Layer III frame from its header, or None."""
    if header[0] != 0xFF or (header[1] & 0xFE) != 0xFA:
        return None
    kbps = _BITRATES_L3[header[2] >> 4]
    rate = {0: 44100, 1: 48000, 2: 32000}.get((header[2] >> 2) & 0x3)
    if not kbps or rate is None:
        return None
    return 144000 * kbps // rate + ((header[2] >> 1) & 1)


def _crc16(data: bytes) -> int:
    """CRC-16/ARC, the LAME tag's checksum."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def open_writer(
    path: Path, fmt: str, sample_rate: int, channels: int, bitrate: int = 192,
    bit_depth: str = "16",
) -> Writer:
    if fmt == "mp3":
        return Mp3Writer(path, sample_rate, channels, bitrate)
    if fmt in ("wav", "flac"):
        return SoundfileWriter(path, fmt, sample_rate, channels, bit_depth)
    raise ValueError(f"unknown format {fmt!r}")
