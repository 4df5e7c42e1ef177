"""Decoding every common input (handler/decode.py) and separating it (handler/pipeline.py).

Inputs are real files written by FFmpeg's encoders (tests/fixtures_audio.py); the expected
sample counts come from decoding the same file with plain PyAV, without our resampler.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fixtures_audio import FORMATS, Made, chord_signal, make, native_decode, random_bytes
from fixtures_audio import write_audio as write_audio_file

from handler.core.decode import DecodeStats, iter_blocks, probe
from handler.core.pipeline import SeparationRequest, separate_file
from handler.errors import UnsupportedAudio

RATE = 44100


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Made]:
    """``media(name)``: the FORMATS file of that name, written once per module."""
    directory = tmp_path_factory.mktemp("media")
    cache: dict[str, Made] = {}

    def get(name: str) -> Made:
        if name not in cache:
            cache[name] = make(name, directory)
        return cache[name]

    return get


def resampled_count(path: Path) -> int:
    native, native_rate = native_decode(path)
    return round(native.shape[1] * RATE / native_rate)


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


# --- the format matrix ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FORMATS))
def test_decodes_to_exact_resampled_length(media, name):
    made = media(name)
    native, native_rate = native_decode(made.path)
    stats = DecodeStats()
    blocks = list(iter_blocks(made.path, rate=RATE, channels=2, stats=stats, block_seconds=0.5))
    total = sum(b.shape[1] for b in blocks)

    assert total == round(native.shape[1] * RATE / native_rate)
    assert stats.native_samples == native.shape[1] and stats.samples_out == total
    assert not stats.truncated and stats.warnings == []
    assert abs(total / RATE - made.seconds) < 0.05, total / RATE  # codec priming at most
    assert all(b.dtype == np.float32 and b.shape[0] == 2 for b in blocks)
    assert all(b.shape[1] == RATE // 2 for b in blocks[:-1])  # fixed-size blocks, streamed
    assert len(blocks) == -(-total // (RATE // 2))

    info = probe(made.path)
    assert (info.sample_rate, info.channels) == (made.rate, made.channels)
    assert abs(info.duration_s - made.seconds) < 0.05

    audio = np.concatenate(blocks, axis=1)
    middle = audio[:, RATE // 4: total - RATE // 4]
    if made.channels in (1, 2):  # each channel keeps its pitch (no rate mix-up) and side
        for c in range(2):
            want = 220.0 * 2 ** ((c if made.channels == 2 else 0) / 4)
            assert abs(dominant_hz(middle[c], RATE) - want) < 3
    if made.lossless and made.rate == RATE and made.channels == 2:
        assert made.source is not None
        assert np.abs(audio - made.source).max() <= 1 / 32768  # 16-bit quantisation at most


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_separates_to_its_duration(demucs_models_module, media, name, tmp_path):
    """A short clip of each kind through the whole pipeline (random htdemucs): the gapless
    MP3 decodes to exactly the decoded input's sample count."""
    made = media(name)
    expected = resampled_count(made.path)
    result = separate_file(made.path, tmp_path / "out", SeparationRequest(model="htdemucs"))
    assert result.warnings == []
    assert result.input_duration_s == expected / RATE
    [output] = result.outputs
    assert output.stem == "instrumental" and output.file.path.name == "instrumental.mp3"
    assert output.file.samples == expected
    decoded, rate = native_decode(output.file.path)
    assert rate == RATE and decoded.shape == (1, expected)
    assert np.abs(decoded).max() > 1e-3  # not silence


# --- channels ---------------------------------------------------------------------------------


def test_mono_is_centred_in_stereo(media):
    made = media("wav_mono_8k")
    stereo = np.concatenate(list(iter_blocks(made.path, rate=RATE, channels=2)), axis=1)
    mono = np.concatenate(list(iter_blocks(made.path, rate=RATE, channels=1)), axis=1)
    assert stereo.shape[0] == 2 and mono.shape == (1, stereo.shape[1])
    np.testing.assert_array_equal(stereo[0], stereo[1])
    np.testing.assert_array_equal(stereo[0], mono[0])


def test_surround_downmix_keeps_left_and_right(tmp_path):
    n = RATE
    t = np.arange(n) / RATE
    data = np.zeros((6, n), np.float32)  # FL, FR, FC, LFE, BL, BR
    data[0] = 0.5 * np.sin(2 * np.pi * 440 * t)
    data[1] = 0.5 * np.sin(2 * np.pi * 660 * t)
    path = write_audio_file(tmp_path / "surround.wav", data, RATE, "pcm_s16le")
    stereo = np.concatenate(list(iter_blocks(path, rate=RATE, channels=2)), axis=1)
    assert stereo.shape == (2, n)
    assert dominant_hz(stereo[0], RATE) == pytest.approx(440, abs=2)
    assert dominant_hz(stereo[1], RATE) == pytest.approx(660, abs=2)
    # The other side leaks nothing: FL does not reach R.
    probe_440 = np.sin(2 * np.pi * 440 * t)
    assert abs(stereo[1] @ probe_440) < 1e-3 * abs(stereo[0] @ probe_440)


# --- damaged and unsupported inputs -----------------------------------------------------------


def truncate(path: Path, fraction: float, dest: Path) -> Path:
    data = path.read_bytes()
    dest.write_bytes(data[: int(len(data) * fraction)])
    return dest


@pytest.fixture(scope="module")
def four_seconds(tmp_path_factory) -> Callable[[str], Made]:
    directory = tmp_path_factory.mktemp("long")
    return lambda name: make(name, directory, seconds=4.0)


def test_truncated_mp3_decodes_what_is_there(demucs_models_module, four_seconds, tmp_path):
    made = four_seconds("mp3")
    cut = truncate(made.path, 0.5, tmp_path / "cut.mp3")
    assert probe(cut).duration_s == pytest.approx(4.0, abs=0.05)  # the header still says 4 s
    stats = DecodeStats()
    total = sum(b.shape[1] for b in iter_blocks(cut, rate=RATE, channels=2, stats=stats))
    assert 1.9 < total / RATE < 2.1  # the frames that are there, no padding to 4 s
    result = separate_file(cut, tmp_path / "out", SeparationRequest(model="htdemucs"))
    assert result.outputs[0].file.samples == total
    assert native_decode(result.outputs[0].file.path)[0].shape[1] == total


def test_truncated_mp3_is_reported(four_seconds, tmp_path):
    made = four_seconds("mp3")
    cut = truncate(made.path, 0.5, tmp_path / "cut.mp3")
    stats = DecodeStats()
    for _ in iter_blocks(cut, rate=RATE, channels=2, stats=stats):
        pass
    assert stats.truncated
    assert any("truncated" in w for w in stats.warnings)


def test_truncated_flac_is_separated_with_a_warning(demucs_models_module, four_seconds, tmp_path):
    made = four_seconds("flac")
    cut = truncate(made.path, 0.5, tmp_path / "cut.flac")
    result = separate_file(cut, tmp_path / "out", SeparationRequest(model="htdemucs"))
    assert len(result.warnings) == 1 and "truncated" in result.warnings[0]
    assert 1.0 < result.input_duration_s < 2.5
    decoded = native_decode(result.outputs[0].file.path)[0]
    assert decoded.shape[1] == round(result.input_duration_s * RATE)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


HTML = b"<!doctype html><html><head><title>Sign in</title></head><body>Sign in</body></html>"

# kind -> (writes the file into a directory, what the message must say)
BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "random_bytes": (lambda d: random_bytes(d / "song.mp3"), "not a decodable audio"),
    "empty": (lambda d: _write(d / "empty.wav", b""), "not a decodable audio"),
    "html_page": (lambda d: _write(d / "download.mp3", HTML * 20), "not a decodable audio"),
    # FFmpeg's best guess for text is its "tty" (ANSI art) demuxer: not an accepted format.
    "text": (lambda d: _write(d / "notes.txt", b"la la la\n" * 200),
             "not an accepted audio or video container"),
    "video_without_audio": (lambda d: make("video_no_audio", d).path,
                            "no audio track (found: video)"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_unsupported_inputs_fail_clearly(kind, tmp_path, demucs_models_module):
    build, message = BAD_INPUTS[kind]
    path = build(tmp_path)
    for attempt in (
        lambda: probe(path),
        lambda: list(iter_blocks(path, rate=RATE, channels=2)),
        lambda: separate_file(path, tmp_path / "out", SeparationRequest(model="htdemucs")),
    ):
        with pytest.raises(UnsupportedAudio) as err:
            attempt()
        text = str(err.value)
        assert text.startswith("UNSUPPORTED_AUDIO: ") and message in text, text
        assert str(tmp_path) not in text and path.name not in text  # no paths leak
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_signal_helper_is_what_the_checks_assume():
    """The pitch checks above rely on chord_signal's fundamental per channel."""
    x = chord_signal(1.0, RATE, 2)
    assert dominant_hz(x[0], RATE) == pytest.approx(220, abs=2)
    assert dominant_hz(x[1], RATE) == pytest.approx(220 * 2 ** 0.25, abs=2)
