"""``demucs-separate`` end to end (handler/cli.py): files and URLs in, stem files out.

Runs the random htdemucs repo (tests/demucs_repo.py). One run goes through a real
``python -m handler.cli`` subprocess; the rest call ``main(argv)`` in-process, which is the
same code without paying for a fresh interpreter and torch import each time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fixtures_audio import native_decode

from devtools.servers import Serve
from devtools.songs import make_mixture
from handler.adapters.cli import main

ROOT = Path(__file__).resolve().parent.parent
RATE = 44100
STEMS = ["instrumental", "drums", "bass", "other", "vocals"]


@pytest.fixture(scope="module")
def song(tmp_path_factory) -> Path:
    """2.6 s stereo WAV: three intervals at cuts 1 s and 2 s, the last one shorter."""
    path = tmp_path_factory.mktemp("cli") / "song.wav"
    sf.write(path, make_mixture(2.6, seed=3)["mixture"].T, RATE, subtype="PCM_16")
    return path


SONG_SAMPLES = round(2.6 * RATE)


def cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "handler.adapters.cli", *args], cwd=ROOT, env={**os.environ, **env},
        capture_output=True, text=True, timeout=timeout,
    )


def read_progress(path: Path) -> dict:
    body = json.loads(path.read_text())
    assert set(body) >= {"state", "tasks", "timestamp", "elapsed_seconds", "details"}
    assert set(body["tasks"]) == {"models", "cutting", "inference", "conversion"}
    assert set(body["details"]) >= {
        "models_ready", "completed_segments", "total_segments", "percent",
    }
    assert isinstance(body["timestamp"], float) and body["elapsed_seconds"] >= 0
    return body


def pcm(path: Path) -> np.ndarray:
    data, rate = sf.read(path, dtype="int16", always_2d=True)
    assert rate == RATE
    return data


# --- success ----------------------------------------------------------------------------------


def test_subprocess_default_writes_instrumental_mp3(demucs_repo, song, tmp_path):
    out, progress = tmp_path / "out", tmp_path / "progress.json"
    env = {"MODELS_DIR": str(demucs_repo), "DEFAULT_MODEL": "htdemucs"}
    proc = cli("--input", str(song), "--output", str(out), "--progress-file", str(progress),
               env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(out / "instrumental.mp3")]
    assert sorted(p.name for p in out.iterdir()) == ["instrumental.mp3"]
    decoded, rate = native_decode(out / "instrumental.mp3")
    assert rate == RATE and decoded.shape == (1, SONG_SAMPLES)  # mono by default, gapless

    body = read_progress(progress)
    assert body["state"] == "completed" and "error" not in body
    assert set(body["tasks"].values()) == {"done"}
    details = body["details"]
    assert details["models_ready"] is True and details["percent"] == 100.0
    assert details["completed_segments"] == details["total_segments"] > 0
    assert details["outputs"] == [str(out / "instrumental.mp3")]
    assert not progress.with_name(progress.name + ".tmp").exists()


@pytest.fixture
def all_stems_wav(demucs_models_module, song, tmp_path) -> Path:
    out = tmp_path / "whole"
    code = main(["-i", str(song), "-o", str(out), "-n", "htdemucs", "--all-stems",
                 "--format", "wav", "--channels", "2", "-q"])
    assert code == 0
    return out


def test_all_stems_and_interval_cut_without_seams(all_stems_wav, song, tmp_path, capsys):
    assert sorted(p.name for p in all_stems_wav.iterdir()) == sorted(f"{s}.wav" for s in STEMS)
    whole = {s: pcm(all_stems_wav / f"{s}.wav") for s in STEMS}
    assert all(w.shape == (SONG_SAMPLES, 2) for w in whole.values())
    assert len({w.tobytes() for w in whole.values()}) == len(STEMS)  # five different stems
    capsys.readouterr()

    out = tmp_path / "cut"
    code = main(["-i", str(song), "-o", str(out), "-n", "htdemucs", "--all-stems",
                 "--format", "wav", "--channels", "2", "--interval-cut", "1,2", "-q"])
    assert code == 0
    names = sorted(f"{s}_{i:03d}.wav" for s in STEMS for i in range(3))
    assert sorted(p.name for p in out.iterdir()) == names
    assert sorted(Path(line).name for line in capsys.readouterr().out.split()) == names
    for stem in STEMS:
        parts = [pcm(out / f"{stem}_{i:03d}.wav") for i in range(3)]
        assert [len(p) for p in parts] == [RATE, RATE, SONG_SAMPLES - 2 * RATE]
        # One separation, cut afterwards: the pieces are the uncut output, sample for sample.
        np.testing.assert_array_equal(np.concatenate(parts), whole[stem])


def test_http_url_input(demucs_models_module, song, http_server, tmp_path, capsys):
    url = http_server.route("/media/song.wav", Serve(song.read_bytes(), "audio/wav"))
    out = tmp_path / "out"
    code = main(["--input", url, "--output", str(out), "--model", "htdemucs",
                 "--stems", "vocals", "--format", "flac", "-q"])
    assert code == 0, capsys.readouterr().err
    assert http_server.hits("/media/song.wav") >= 1
    data, rate = sf.read(out / "vocals.flac", always_2d=True)
    assert rate == RATE and data.shape == (SONG_SAMPLES, 1)
    assert np.abs(data).max() > 1e-3


# --- failures ---------------------------------------------------------------------------------


def test_subprocess_missing_file_fails_with_one_line(demucs_repo, tmp_path):
    out, progress = tmp_path / "out", tmp_path / "p.json"
    proc = cli("--input", str(tmp_path / "nope.wav"), "--output", str(out),
               "--progress-file", str(progress), env={"MODELS_DIR": str(demucs_repo)})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"demucs-separate: INVALID_INPUT: input file not found: {tmp_path / 'nope.wav'}"
    ]
    assert proc.stdout == "" and not out.exists()
    body = read_progress(progress)
    assert body["state"] == "error" and body["error"].startswith("INVALID_INPUT: ")
    assert body["tasks"]["cutting"] == "error"


FAILURES = {  # id: (arguments, start of the message, whether a running task turned to error)
    "unknown_model": (["--model", "no_such_model"],
                      "INVALID_INPUT: unknown model 'no_such_model'", True),
    "model_not_baked": (["--model", "htdemucs_6s"],
                        "MODEL_UNAVAILABLE: model 'htdemucs_6s' is not baked", True),
    "unknown_stem": (["--model", "htdemucs", "--stems", "guitar"],
                     "INVALID_INPUT: model htdemucs has no stem 'guitar'", True),
    "bad_cuts": (["--model", "htdemucs", "--interval-cut", "1,x"],
                 "INVALID_INPUT: --interval-cut must be comma-separated seconds", False),
    "html_as_mp3": (["--model", "htdemucs"], "UNSUPPORTED_AUDIO: not a decodable audio", True),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failures_are_one_line_with_an_error_state(
    demucs_models_module, song, tmp_path, capsys, case
):
    args, expected, task_error = FAILURES[case]
    source = song
    if case == "html_as_mp3":  # a login page saved under a song's name
        source = tmp_path / "song.mp3"
        source.write_text("<!doctype html><html><body><h1>Sign in</h1></body></html>\n" * 20)
    progress, out = tmp_path / "p.json", tmp_path / "out"
    code = main(["-i", str(source), "-o", str(out), "--progress-file", str(progress), "-q",
                 *args])
    err = capsys.readouterr().err
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"demucs-separate: {expected}"), err
    body = read_progress(progress)
    assert body["state"] == "error" and body["error"].startswith(expected)
    assert ("error" in body["tasks"].values()) == task_error
    assert "running" not in body["tasks"].values()
    assert not out.exists() or not any(out.iterdir())
