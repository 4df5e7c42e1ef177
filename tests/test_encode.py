"""Encoders (handler/encode.py): gapless MP3 with a LAME Info tag, WAV and FLAC, fed in blocks.

Every file is decoded back with FFmpeg (PyAV) or libsndfile, the way a listener's tools read it.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from fixtures_audio import chord_signal, native_decode

from devtools.metrics import snr_db
from handler.core.decode import probe
from handler.core.encode import Mp3Writer, open_writer

RATE = 44100


def write_in_blocks(writer, data: np.ndarray, seed: int = 0):
    """Feed ``data`` in irregular blocks (as the engine does), including an empty one."""
    rng = np.random.default_rng(seed)
    pos = 0
    writer.write(data[:, :0])
    while pos < data.shape[1]:
        step = int(rng.integers(1, 30000))
        writer.write(data[:, pos:pos + step])
        pos += step
    return writer.close()


def best_lag(ref: np.ndarray, est: np.ndarray, max_lag: int = 2048) -> int:
    """The shift of ``est`` against ``ref`` (1-D) with the highest cross-correlation."""
    n = len(ref) + len(est)
    corr = np.fft.irfft(np.fft.rfft(est, n) * np.conj(np.fft.rfft(ref, n)), n)
    lags = np.r_[np.arange(0, max_lag + 1), np.arange(-max_lag, 0)]
    return int(lags[np.argmax(corr[lags])])




# --- MP3 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length, channels, bitrate, rate",
    [
        (1, 2, 192, RATE),
        (1151, 1, 128, RATE),
        (1152, 2, 320, RATE),
        (RATE + 7, 1, 192, RATE),
        (3 * RATE + 333, 2, 128, RATE),
        (2 * RATE + 1, 2, 320, RATE),
        (RATE + 4321, 2, 192, 48000),
    ],
)
def test_mp3_is_gapless(tmp_path, length, channels, bitrate, rate):
    data = chord_signal(length / rate, rate, 2, seed=length)[:, :length]
    assert data.shape[1] == length
    encoded = write_in_blocks(Mp3Writer(tmp_path / "x.mp3", rate, channels, bitrate), data)
    assert (encoded.samples, encoded.channels, encoded.bitrate) == (length, channels, bitrate)
    assert encoded.bytes == encoded.path.stat().st_size > 0
    decoded, decoded_rate = native_decode(encoded.path)
    assert decoded_rate == rate
    assert decoded.shape == (channels, length)  # no encoder delay, no padding
    assert probe(encoded.path).duration_s == pytest.approx(length / rate, abs=1e-6)
    if length >= RATE:  # aligned sample for sample, not merely the right count
        want = data if channels == 2 else data.mean(axis=0, keepdims=True)
        assert all(best_lag(want[c], decoded[c]) == 0 for c in range(channels))
        mid = slice(2048, length - 2048)
        snr = snr_db(want[:, mid], decoded[:, mid])
        print(f"mp3 {bitrate} kbps {channels} ch: SNR {snr:.1f} dB")
        assert snr > 15


def test_mp3_clamps_instead_of_wrapping(tmp_path):
    t = np.arange(RATE) / RATE
    loud = (3.0 * np.sin(2 * np.pi * 441 * t)).astype(np.float32)
    data = np.stack([loud, -loud])
    encoded = write_in_blocks(Mp3Writer(tmp_path / "loud.mp3", RATE, 2, 192), data)
    decoded, _ = native_decode(encoded.path)
    assert np.abs(decoded).max() <= 1.0
    clipped = np.clip(data, -1, 1)
    mid = slice(2048, RATE - 2048)
    assert snr_db(clipped[:, mid], decoded[:, mid]) > 15  # wrapped int16 would be noise
    assert np.all(np.sign(decoded[0, mid][np.abs(clipped[0, mid]) > 0.9])
                  == np.sign(clipped[0, mid][np.abs(clipped[0, mid]) > 0.9]))


def test_mp3_without_samples_is_an_empty_file(tmp_path):
    encoded = Mp3Writer(tmp_path / "empty.mp3", RATE, 2, 192).close()
    assert encoded.samples == 0 and encoded.bytes == 0


def test_mp3_rejects_unknown_bitrate(tmp_path):
    with pytest.raises(ValueError, match="bitrate"):
        Mp3Writer(tmp_path / "x.mp3", RATE, 2, 100)
    assert not (tmp_path / "x.mp3").exists()


# --- WAV / FLAC -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["wav", "flac"])
@pytest.mark.parametrize("length", [1, 4097, RATE + 13])
def test_pcm_formats_round_trip(tmp_path, fmt, length):
    data = 1.2 * chord_signal(length / RATE + 0.01, RATE, 2, seed=length)[:, :length]
    data[:, : min(length, 3)] = [[1.0], [-1.0]]  # full scale both ways
    encoded = write_in_blocks(open_writer(tmp_path / f"x.{fmt}", fmt, RATE, 2), data)
    assert (encoded.samples, encoded.format, encoded.bitrate) == (length, fmt, None)
    decoded, rate = sf.read(encoded.path, dtype="float64", always_2d=True)
    assert rate == RATE and decoded.shape == (length, 2)
    assert sf.info(str(encoded.path)).subtype == "PCM_16"
    assert np.abs(decoded.T - np.clip(data, -1, 1)).max() <= 1 / 32768
    ffmpeg, _ = native_decode(encoded.path)  # FFmpeg reads the same
    np.testing.assert_array_equal(ffmpeg, decoded.T)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_one_channel_is_the_mean_of_left_and_right(tmp_path, fmt):
    t = np.arange(RATE) / RATE
    left = 0.6 * np.sin(2 * np.pi * 440 * t)
    right = 0.3 * np.sin(2 * np.pi * 440 * t + 1.0) + 0.2 * np.sin(2 * np.pi * 1000 * t)
    data = np.stack([left, right]).astype(np.float32)
    encoded = write_in_blocks(open_writer(tmp_path / f"m.{fmt}", fmt, RATE, 1), data)
    decoded, _ = native_decode(encoded.path)
    assert decoded.shape == (1, RATE)
    mean = data.mean(axis=0)
    if fmt == "mp3":
        assert snr_db(mean[2048:-2048], decoded[0, 2048:-2048]) > 20
        assert snr_db(left[2048:-2048], decoded[0, 2048:-2048]) < 10  # not just one side
    else:
        assert np.abs(decoded[0] - mean).max() <= 1 / 32768


def test_mono_block_to_stereo_file_is_repeated(tmp_path):
    mono = chord_signal(0.5, RATE, 1)
    encoded = write_in_blocks(open_writer(tmp_path / "s.wav", "wav", RATE, 2), mono)
    decoded, _ = sf.read(encoded.path, always_2d=True)
    np.testing.assert_array_equal(decoded[:, 0], decoded[:, 1])
    assert np.abs(decoded[:, 0] - mono[0]).max() <= 1 / 32768


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_abort_removes_the_partial_file(tmp_path, fmt):
    writer = open_writer(tmp_path / f"a.{fmt}", fmt, RATE, 2)
    writer.write(chord_signal(0.2, RATE, 2))
    writer.abort()
    assert not (tmp_path / f"a.{fmt}").exists()
