"""Hostile and odd inputs, round two (issue 12): what the 66-case matrix of test_bad_input.py
does not cover.

* FFmpeg demuxers that open other files (concat lists, HLS/DASH playlists, SDP, image
  sequences): refused before anything else is opened; a self-referencing ffconcat list in a
  child process with a 4 MB thread stack must not crash it.
* Decoder bombs (headers claiming absurd rates or channel counts, input worth no sample).
* Channel counts FFmpeg has no default layout for (9, 11, 13 ... channels), downmixed.
* Slow downloads: whole-download deadline, minimum average rate, progress that moves, a
  body that does not match its Content-Encoding.
* SIGINT/SIGTERM on local runs, sent to real child processes mid-work.
* A presigned PUT answered 200 whose ETag is not the body's MD5; share-link tokens in URL
  paths kept out of logs.

Everything runs against real FFmpeg (PyAV), real local HTTP servers and the real
spleeter_2stems model. Every job case checks the single final item, that WORK_DIR is empty
afterwards, and the worker serves a good job after every few cases.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from worker_helpers import (
    RATE,
    ROOT,
    assert_clean,
    b64,
    check_audio,
    check_error,
    check_final,
    fetch,
    fresh_work_dir,
    input_bytes,
    run_good_job,
    run_in_process,
    worker_env,
    write_input,
)

from devtools.servers import AcceptPut, LocalHTTPServer, Serve, Status
from handler.core.decode import MAX_CHANNELS, DecodeStats, iter_blocks, open_input, probe
from handler.errors import UnsupportedAudio, UploadFailed
from handler.redact import log_url
from handler.transfer import integrity
from handler.transfer.http import put_presigned

GOOD_EVERY = 4
REFUSED = "the file is not an accepted audio or video container"
NOT_MEDIA = "not a decodable audio or video file"


# --- media ------------------------------------------------------------------------------


def raw_wav(rate: int, channels: int = 2, frames: int = 2000) -> bytes:
    """A PCM 16-bit WAV whose header says ``rate`` and ``channels`` (any values: the header
    fields are written as given, as a hostile file would)."""
    data = (np.random.default_rng(0).standard_normal((frames, channels)) * 3000)
    data = data.astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, channels, rate, (rate * channels * 2) & 0xFFFFFFFF,
                      (channels * 2) & 0xFFFF, 16)
    chunks = (b"fmt " + struct.pack("<I", len(fmt)) + fmt
              + b"data" + struct.pack("<I", len(data)) + data)
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def channel_gains(channels: int) -> np.ndarray:
    return np.linspace(0.05, 0.5, channels)


def multichannel_wav(path: Path, channels: int, seconds: float = 1.0) -> np.ndarray:
    """A real soundfile WAV: channel k is gain_k * a 440 Hz sine. Returns the equal mix."""
    t = np.arange(round(seconds * RATE)) / RATE
    tone = np.sin(2 * np.pi * 440 * t)
    audio = channel_gains(channels)[:, None] * tone[None, :]
    sf.write(str(path), audio.T, RATE, subtype="PCM_16")
    return audio.mean(axis=0)


def png_bytes() -> bytes:
    """A real 2x2 PNG image (what FFmpeg's png_pipe demuxer picks up)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + b"\xff\x00\x00" * 2 for _ in range(2))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@dataclass
class Media:
    wav_1s: bytes
    local_wav: Path  # a real song on the worker's disk that no playlist may reach


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Media:
    local = tmp_path_factory.mktemp("private") / "secret-song.wav"
    write_input(local, 1.0)
    return Media(wav_1s=input_bytes(1.0)[0], local_wav=local)


@pytest.fixture(autouse=True)
def work_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fast_local_network: None) -> Path:
    return fresh_work_dir(monkeypatch, tmp_path, "DEFAULT_MODEL", "MAX_DURATION_S", "MODELS_DIR",
                          "MAX_DOWNLOAD_MB", "MAX_BASE64_INPUT_MB", "PROGRESS_INTERVAL_S",
                          "DOWNLOAD_DEADLINE_S", "DOWNLOAD_MIN_RATE_KBPS", keep_bucket=False)


# --- a server that trickles -------------------------------------------------------------


class TrickleServer:
    """Raw HTTP/1.1 on 127.0.0.1 answering every request with a 200 sent ``piece`` bytes at
    a time every ``interval_s``: the body only, or (``slow_head``) the headers too. After
    GIVE_UP_S it hangs up, so a client without a deadline fails the test instead of hanging."""

    GIVE_UP_S = 20.0

    def __init__(self, body: bytes, *, interval_s: float, piece: int = 1,
                 slow_head: bool = False, headers: dict[str, str] | None = None,
                 content_length: bool = True) -> None:
        self.body, self.interval_s, self.piece, self.slow_head = body, interval_s, piece, slow_head
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        if content_length:  # else the body ends when the connection closes
            extra = f"Content-Length: {len(body)}\r\n{extra}"
        self.head = (f"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\n"
                     f"{extra}Connection: close\r\n\r\n").encode()
        self.hits = 0
        self.stop_event = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/slow/song.wav"
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> TrickleServer:
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for t in self._threads:
            t.join(timeout=5)
        self._sock.close()

    def _accept(self) -> None:
        while not self.stop_event.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                data = conn.recv(4096)
                if not data:
                    return
                request += data
            self.hits += 1
            try:
                if self.slow_head:
                    payload = self.head + self.body
                else:
                    conn.sendall(self.head)
                    payload = self.body
                started = time.monotonic()
                for i in range(0, len(payload), self.piece):
                    if self.stop_event.wait(self.interval_s) or \
                            time.monotonic() - started > self.GIVE_UP_S:
                        return
                    conn.sendall(payload[i:i + self.piece])
            except OSError:  # the client gave up: what the deadline tests provoke
                return


# --- the job matrix: demuxers that open other files, decoder bombs, channel bounds -------


@dataclass
class Case:
    id: str
    data: Callable[[Media, LocalHTTPServer], bytes]
    messages: tuple[str, ...]  # the error message contains one of these
    code: str = "UNSUPPORTED_AUDIO"
    env: dict[str, str] = field(default_factory=dict)
    route: str | None = None  # a path the input names: it must never be requested


def concat_list(*entries: str) -> Callable[[Media, LocalHTTPServer], bytes]:
    def make(media: Media, http: LocalHTTPServer) -> bytes:
        names = [e.format(local=media.local_wav, url=http.url("/named.wav")) for e in entries]
        return ("ffconcat version 1.0\n" + "".join(f"file '{n}'\n" for n in names)).encode()
    return make


def hls(entry: str) -> Callable[[Media, LocalHTTPServer], bytes]:
    def make(media: Media, http: LocalHTTPServer) -> bytes:
        target = entry.format(local=media.local_wav, url=http.url("/named.wav"))
        return ("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n"
                f"#EXTINF:1.0,\n{target}\n#EXTINF:1.0,\n{target}\n#EXT-X-ENDLIST\n").encode()
    return make


def dash(media: Media, http: LocalHTTPServer) -> bytes:
    return (
        '<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" '
        'mediaPresentationDuration="PT1S" minBufferTime="PT1S" '
        'profiles="urn:mpeg:dash:profile:isoff-on-demand:2011"><Period><AdaptationSet '
        f'mimeType="audio/wav"><Representation id="a" bandwidth="1"><BaseURL>'
        f'{http.url("/named.wav")}</BaseURL></Representation></AdaptationSet></Period></MPD>'
    ).encode()


def sdp(media: Media, http: LocalHTTPServer) -> bytes:
    # FFmpeg's sdp demuxer would open RTP sockets and wait for packets.
    return (b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=song\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            b"m=audio 5004 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


CASES = [
    # --- demuxers that open other files or URLs -----------------------------------------
    Case("ffconcat-self", lambda m, h: b"ffconcat version 1.0\nfile input\nfile 'input'\n",
         (REFUSED,)),
    Case("ffconcat-local-file", concat_list("{local}"), (REFUSED,)),
    Case("ffconcat-url", concat_list("{url}"), (REFUSED,), route="/named.wav"),
    Case("ffconcat-subfile", concat_list("subfile,,start,0,end,100,,:{local}",
                                         "data:audio/wav;base64,UklGRg=="), (REFUSED,)),
    # FFmpeg's hls probe also wants a .m3u8 name, which the worker's "input" lacks; the
    # CLI keeps names (test_playlists_with_their_own_names_are_refused).
    Case("hls-local-file", hls("file://{local}"), (REFUSED, NOT_MEDIA)),
    Case("hls-url", hls("{url}"), (REFUSED, NOT_MEDIA), route="/named.wav"),
    Case("dash-mpd-url", dash, (REFUSED, NOT_MEDIA),
         route="/named.wav"),
    Case("sdp-rtp", sdp, (REFUSED,)),
    Case("png-image", lambda m, h: png_bytes(), (REFUSED,)),
    Case("ffmetadata", lambda m, h: b";FFMETADATA1\ntitle=song\nartist=x\n", (REFUSED,)),
    # --- decoder bombs ------------------------------------------------------------------
    Case("wav-1ghz", lambda m, h: raw_wav(1_000_000_000),
         ("claims a sample rate of 1000000000 Hz; accepted: 1000-768000 Hz",)),
    Case("wav-2ghz", lambda m, h: raw_wav(2_000_000_000),
         ("claims a sample rate of 2000000000 Hz",)),
    Case("wav-500hz", lambda m, h: raw_wav(500), ("claims a sample rate of 500 Hz",)),
    Case("wav-0hz", lambda m, h: raw_wav(0), ("not a decodable audio or video file",)),
    Case("wav-768khz-5-samples", lambda m, h: raw_wav(768_000, frames=5),
         ("the audio track is too short: 5 samples", "decode to no sample at 44100 Hz")),
    Case("wav-200-channels", lambda m, h: raw_wav(44100, channels=200, frames=4),
         ("the audio track has 200 channels; accepted: 1-64",)),
    Case("wav-65-channels", lambda m, h: wav_of_channels(65),
         ("the audio track has 65 channels; accepted: 1-64",)),
]


def wav_of_channels(channels: int) -> bytes:
    buf = io.BytesIO()
    audio = np.full((RATE // 10, channels), 0.1, np.float32)
    sf.write(buf, audio, RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


class Served:
    def __init__(self) -> None:
        self.bad = 0


@pytest.fixture(scope="module")
def served() -> Served:
    from handler.core.models import get_model

    get_model("spleeter_2stems")  # loaded once, so the timings below are the refusals'
    return Served()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, media: Media, http_server: LocalHTTPServer, served: Served,
                       work_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    if case.route:
        http_server.route(case.route, Serve(media.wav_1s))
    data = case.data(media, http_server)

    started = time.monotonic()
    run = run_in_process({"id": f"hostile-{case.id}",
                          "input": {"audio_base64": b64(data), "return_base64": True}})

    check_error(run, case.code)
    message = run.final["error"]
    assert any(m in message for m in case.messages), message
    assert str(work_dir) not in message and str(media.local_wav) not in message
    assert time.monotonic() - started < 20  # refused from the header, not after the work
    if case.route:
        assert http_server.hits(case.route) == 0, "a playlist entry was fetched"
    assert_clean(work_dir)
    served.bad += 1
    if served.bad % GOOD_EVERY == 0:
        run_good_job(work_dir, input_bytes(1.0))


def test_still_serving_after_the_hostile_matrix(work_dir: Path) -> None:
    run_good_job(work_dir, input_bytes(1.0))


def test_self_referencing_ffconcat_does_not_crash_a_small_stack_child(tmp_path: Path,
                                                                     work_dir: Path) -> None:
    """The job thread gets a 4 MB stack (as in the report): FFmpeg reopening the list until
    it runs out of descriptors used to overflow it (SIGSEGV, no final item, folder left)."""
    work = work_dir
    payload = tmp_path / "job.json"
    payload.write_text(json.dumps({"id": "self-concat", "input": {
        "audio_base64": b64(b"ffconcat version 1.0\nfile input\nfile 'input'\n"),
        "return_base64": True}}))
    script = (
        "import json, sys, threading\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "threading.stack_size(4 * 1024 * 1024)\n"
        "from worker_helpers import run_in_process\n"
        "run = run_in_process(json.loads(open(sys.argv[1]).read()))\n"
        "print(json.dumps(run.final))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(payload)], cwd=tmp_path,
                          env=worker_env(WORK_DIR=str(work)), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final == {"error": f"UNSUPPORTED_AUDIO: {REFUSED} (playlists, concat lists, image "
                              "sequences and other formats that read further files are "
                              "refused)"}
    assert_clean(work)


@pytest.mark.parametrize("name,make", [
    ("list.m3u8", hls("file://{local}")), ("remote.m3u8", hls("{url}")),
    ("list.ffconcat", concat_list("{local}")), ("self.ffconcat", concat_list("self.ffconcat")),
    ("stream.sdp", sdp), ("frame.png", lambda m, h: png_bytes()),
])
def test_playlists_with_their_own_names_are_refused(name: str, make: Callable[..., bytes],
                                                    tmp_path: Path, media: Media,
                                                    http_server: LocalHTTPServer) -> None:
    """As the CLI opens them: a local file keeps its name, and with it FFmpeg's
    extension-based probes (hls wants .m3u8)."""
    http_server.route("/named.wav", Serve(media.wav_1s))
    path = tmp_path / name
    path.write_bytes(make(media, http_server))
    for attempt in (lambda: probe(path), lambda: list(iter_blocks(path, rate=RATE, channels=2))):
        with pytest.raises(UnsupportedAudio) as err:
            attempt()
        assert REFUSED in str(err.value)
    with pytest.raises(UnsupportedAudio):
        open_input(path)
    assert http_server.hits("/named.wav") == 0


def test_a_path_that_looks_like_a_protocol_is_just_a_file(tmp_path: Path,
                                                          media: Media) -> None:
    """Input paths are opened as ``file:``: a CLI user's file named like an FFmpeg protocol
    (concat:, subfile:, data:) is read as itself, never parsed as that protocol."""
    for name in ("concat:a.wav|b.wav", "subfile:x.wav", "data:audio"):
        path = tmp_path / name
        path.write_bytes(media.wav_1s)
        assert probe(path).container == "wav"
        assert sum(b.shape[1] for b in iter_blocks(path, rate=RATE, channels=2)) == RATE


def test_accepted_containers_still_open(tmp_path: Path) -> None:
    """The whitelist admits every container the worker is meant to read: files written by
    FFmpeg's own muxers for each (a misspelt demuxer name would refuse a whole format)."""
    import av

    made = {
        "wav": ("wav", "pcm_s16le"), "flac": ("flac", "flac"), "mp3": ("mp3", "libmp3lame"),
        "ogg": ("ogg", "flac"), "opus": ("ogg", "libopus"), "m4a": ("mp4", "aac"),
        "alac": ("ipod", "alac"), "mka": ("matroska", "flac"), "webm": ("webm", "libopus"),
        "aiff": ("aiff", "pcm_s16be"), "caf": ("caf", "pcm_s16le"), "au": ("au", "pcm_s16be"),
        "w64": ("w64", "pcm_s16le"), "wma": ("asf", "wmav2"), "avi": ("avi", "pcm_s16le"),
        "ts": ("mpegts", "mp2"), "ac3": ("ac3", "ac3"), "wv": ("wv", "wavpack"),
        "nut": ("nut", "pcm_s16le"), "flv": ("flv", "aac"), "mpg": ("mpeg", "mp2"),
    }
    t = np.arange(RATE // 2) / RATE
    tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    opened, unwritable = {}, []
    for ext, (fmt, codec) in made.items():
        path = tmp_path / f"song.{ext}"
        try:
            write_with_ffmpeg(path, fmt, codec, tone)
        except (av.FFmpegError, ValueError):  # an encoder this build lacks or sets up otherwise
            unwritable.append(ext)
            continue
        info = probe(path)
        blocks = list(iter_blocks(path, rate=RATE, channels=2))
        opened[ext] = info.container
        assert sum(b.shape[1] for b in blocks) > RATE // 4, ext
    assert len(opened) >= 15, (opened, unwritable)


def write_with_ffmpeg(path: Path, fmt: str, codec: str, tone: np.ndarray) -> None:
    import av

    with av.open(str(path), "w", format=fmt) as out:
        rate = 48000 if codec == "libopus" else RATE
        stream = out.add_stream(codec, rate=rate, layout="stereo")
        stream.bit_rate = 128000
        convert = av.AudioResampler(format=stream.format.name, layout="stereo", rate=rate)
        size = stream.codec_context.frame_size or 1024
        data = np.ascontiguousarray(np.tile(tone, (2, 1)))
        pts = 0
        for i in range(0, data.shape[1], size):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, i:i + size]),
                                               format="fltp", layout="stereo")
            frame.sample_rate = RATE
            for converted in convert.resample(frame):
                converted.pts, converted.time_base = pts, Fraction(1, rate)
                pts += converted.samples
                for packet in stream.encode(converted):
                    out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


# --- channel counts with no FFmpeg layout ------------------------------------------------


NO_DEFAULT_LAYOUT = [9, 11, 13, 15, 17, 18, 19, 20, 21, 22, 23, 25, 33, MAX_CHANNELS]


@pytest.mark.parametrize("channels", NO_DEFAULT_LAYOUT)
def test_channel_counts_without_a_layout_are_mixed_equally(channels: int,
                                                           tmp_path: Path) -> None:
    path = tmp_path / f"poly{channels}.wav"
    expected = multichannel_wav(path, channels)
    assert probe(path).channels == channels
    stats = DecodeStats()
    out = np.concatenate(list(iter_blocks(path, rate=RATE, channels=2, stats=stats)), axis=1)
    assert out.shape == (2, RATE) and stats.samples_out == RATE
    assert np.array_equal(out[0], out[1])
    np.testing.assert_allclose(out[0], expected, atol=2e-4)  # 16-bit quantisation
    mono = np.concatenate(list(iter_blocks(path, rate=22050, channels=1)), axis=1)
    assert mono.shape == (1, 22050)


@pytest.mark.parametrize("channels", [3, 6, 8, 10, 12, 14, 16, 24])
def test_channel_counts_with_a_layout_still_use_ffmpegs_downmix(channels: int,
                                                                tmp_path: Path) -> None:
    path = tmp_path / f"multi{channels}.wav"
    multichannel_wav(path, channels, seconds=0.5)
    out = np.concatenate(list(iter_blocks(path, rate=RATE, channels=2)), axis=1)
    assert out.shape == (2, RATE // 2) and np.abs(out).max() > 0.05


@pytest.mark.parametrize("channels", [9, 25])
def test_polywav_job_completes(channels: int, tmp_path: Path, work_dir: Path) -> None:
    path = tmp_path / "poly.wav"
    multichannel_wav(path, channels)
    run = run_in_process({"id": f"poly{channels}", "input": {
        "audio_base64": b64(path.read_bytes()), "return_base64": True, "channels": 2,
        "output_format": "wav"}})
    check_final(run.final, n_outputs=1)
    out = run.final["outputs"][0]
    check_audio(fetch(out["url"]), out, samples=RATE, channels=2)
    assert_clean(work_dir)


def test_rate_change_midway_gets_a_fresh_resampler(tmp_path: Path) -> None:
    """Two MP3s back to back, 44.1 kHz then 48 kHz (a careless concatenation): PyAV's
    resampler refuses a frame that differs from its first; both halves decode."""
    from handler.core.encode import open_writer

    parts = []
    for rate in (44100, 48000):
        p = tmp_path / f"{rate}.mp3"
        w = open_writer(p, "mp3", rate, 2, 192)
        w.write(np.full((2, rate), 0.1, np.float32))
        w.close()
        parts.append(p.read_bytes())
    path = tmp_path / "both.mp3"
    path.write_bytes(parts[0] + parts[1])
    n = sum(b.shape[1] for b in iter_blocks(path, rate=RATE, channels=2))
    assert 2 * RATE - 4096 <= n <= 2 * RATE + 4096, n


# --- slow and mis-encoded downloads --------------------------------------------------------


def url_job(url: str) -> dict[str, Any]:
    return {"id": "slow", "input": {"audio_url": url, "return_base64": True}}


def test_one_byte_a_second_hits_the_deadline(media: Media, work_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Each byte arrives well inside DOWNLOAD_TIMEOUT_S (2 s here): only the whole-download
    deadline stops it."""
    monkeypatch.setenv("DOWNLOAD_DEADLINE_S", "3")
    monkeypatch.setenv("DOWNLOAD_MIN_RATE_KBPS", "0")
    with TrickleServer(media.wav_1s, interval_s=0.5) as server:
        started = time.monotonic()
        run = run_in_process(url_job(server.url))
        took = time.monotonic() - started
    check_error(run, "DOWNLOAD_FAILED")
    assert "the download did not finish within 3 s (DOWNLOAD_DEADLINE_S) from http://127.0.0.1:" \
        in run.final["error"], run.final
    assert 2.5 < took < 12, took
    assert server.hits == 1
    assert_clean(work_dir)
    run_good_job(work_dir, input_bytes(1.0))


def test_trickled_headers_hit_the_deadline(media: Media, work_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The status line and headers trickle too: the deadline covers the wait for them."""
    monkeypatch.setenv("DOWNLOAD_DEADLINE_S", "2")
    with TrickleServer(media.wav_1s, interval_s=0.3, slow_head=True) as server:
        started = time.monotonic()
        run = run_in_process(url_job(server.url))
        took = time.monotonic() - started
    check_error(run, "DOWNLOAD_FAILED")
    assert "did not finish within 2 s" in run.final["error"], run.final
    assert took < 10, took
    assert_clean(work_dir)


def test_slow_average_rate_fails_after_the_grace(media: Media, work_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOWNLOAD_DEADLINE_S", "0")  # off: the rate alone must stop it
    monkeypatch.setenv("DOWNLOAD_MIN_RATE_KBPS", "4")
    monkeypatch.setenv("DOWNLOAD_TIMEOUT_S", "1.5")  # also the grace before judging the rate
    with TrickleServer(media.wav_1s, interval_s=0.2, piece=64) as server:  # ~0.3 KB/s
        started = time.monotonic()
        run = run_in_process(url_job(server.url))
        took = time.monotonic() - started
    check_error(run, "DOWNLOAD_FAILED")
    message = run.final["error"]
    assert "too slow: " in message and "the minimum is 4 KB/s (DOWNLOAD_MIN_RATE_KBPS)" \
        in message, message
    assert 1.4 < took < 10, took
    assert server.hits == 1  # not retried
    assert_clean(work_dir)


def test_deadline_counts_retries_and_backoff(http_server: LocalHTTPServer, work_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOWNLOAD_DEADLINE_S", "1.5")
    monkeypatch.setenv("RETRY_BACKOFF_S", "1")  # 1 s, then 2 s: the second wait would pass it
    url = http_server.route("/flaky", Status(503))
    run = run_in_process(url_job(url))
    check_error(run, "DOWNLOAD_FAILED")
    assert "did not finish within 1.5 s" in run.final["error"], run.final
    assert http_server.hits("/flaky") == 2
    assert_clean(work_dir)


def test_slow_download_progress_keeps_moving(work_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2 s clip (~350 KB) sent in 16 KB pieces over ~5 s: progress items keep coming
    during the download and their fraction rises, then the job completes."""
    monkeypatch.setenv("PROGRESS_INTERVAL_S", "0.2")
    data, samples = input_bytes(2.0)
    with TrickleServer(data, interval_s=0.2, piece=16 * 1024) as server:
        run = run_in_process(url_job(server.url))
    check_final(run.final, n_outputs=1)
    out = run.final["outputs"][0]
    check_audio(fetch(out["url"]), out, samples=samples, channels=1)
    during = [p["progress"] for p in run.progress if p["stage"] == "download"]
    assert len(during) >= 4, run.progress
    assert len(set(during)) >= 3 and during == sorted(during), during
    assert 0 < during[-1] <= 0.08
    assert [p["total_bytes"] for p in run.progress if p["stage"] == "download"][-1] == len(data)
    assert_clean(work_dir)


def test_download_without_content_length_still_shows_progress(
        work_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No Content-Length (the body ends at the connection's close): the bar still moves
    during the download, the items say how many bytes arrived, and the job completes."""
    monkeypatch.setenv("PROGRESS_INTERVAL_S", "0.2")
    data, samples = input_bytes(2.0)
    with TrickleServer(data, interval_s=0.2, piece=16 * 1024, content_length=False) as server:
        run = run_in_process(url_job(server.url))
    check_final(run.final, n_outputs=1)
    out = run.final["outputs"][0]
    check_audio(fetch(out["url"]), out, samples=samples, channels=1)
    items = [p for p in run.progress if p["stage"] == "download"]
    assert len(items) >= 4, run.progress
    assert all(p["total_bytes"] is None for p in items), items
    got = [p["downloaded_bytes"] for p in items]
    assert got == sorted(got) and len(set(got)) >= 3 and 0 < got[-1] <= len(data), got
    during = [p["progress"] for p in items]
    assert during == sorted(during) and 0 < during[-1] < 0.08, during
    assert_clean(work_dir)


def test_wrong_content_encoding_fails_at_once(http_server: LocalHTTPServer, media: Media,
                                              work_dir: Path) -> None:
    url = http_server.route("/gz.wav", Serve(media.wav_1s, headers={"Content-Encoding": "gzip"}))
    run = run_in_process(url_job(url))
    check_error(run, "DOWNLOAD_FAILED")
    assert "the body does not match its Content-Encoding header from http://127.0.0.1:" \
        in run.final["error"], run.final
    assert http_server.hits("/gz.wav") == 1
    assert_clean(work_dir)


def test_right_content_encoding_is_decoded(http_server: LocalHTTPServer, work_dir: Path) -> None:
    data, samples = input_bytes(1.0)
    url = http_server.route("/ok.wav", Serve(gzip.compress(data),
                                             headers={"Content-Encoding": "gzip"}))
    run = run_in_process(url_job(url))
    check_final(run.final, n_outputs=1)
    out = run.final["outputs"][0]
    check_audio(fetch(out["url"]), out, samples=samples, channels=1)
    assert_clean(work_dir)


# --- SIGINT / SIGTERM on local runs -------------------------------------------------------


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], what: str,
             timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} within {timeout_s} s")
        time.sleep(0.05)


def stop_with(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, proc.stderr.read().decode(errors="replace") if proc.stderr else ""


@pytest.fixture(scope="module")
def long_song(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("long") / "song.wav"
    write_input(path, 60.0)
    return path.read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_local_handler_run_interrupted_mid_separation(
        sig: int, long_song: bytes, http_server: LocalHTTPServer, tmp_path: Path,
        work_dir: Path) -> None:
    url = http_server.route("/long.wav", Serve(long_song))
    log = tmp_path / "stderr.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-u", str(ROOT / "handler" / "handler.py"), "--test_input",
             json.dumps({"input": {"audio_url": url, "return_base64": True}})],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=err,
            env=worker_env(WORK_DIR=str(work_dir), ALLOW_PRIVATE_URLS="1",
                           PROGRESS_INTERVAL_S="0.2"))
    try:
        wait_for(proc, lambda: b"[separate]" in log.read_bytes(), "separation")
        assert any(work_dir.rglob("input")), "the downloaded input should be there now"
        proc.send_signal(sig)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = log.read_text().strip().splitlines()
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, (proc.returncode, lines[-5:])
    assert lines[-1] == (f"handler: interrupted by {name}; the job was stopped and its "
                         "temporary files removed"), lines[-5:]
    assert "Traceback" not in log.read_text()
    assert proc.stdout is not None and proc.stdout.read() == b""  # no result printed
    assert_clean(work_dir)


def test_local_handler_run_interrupted_mid_download(media: Media, tmp_path: Path,
                                                    work_dir: Path) -> None:
    log = tmp_path / "stderr.log"
    with TrickleServer(media.wav_1s, interval_s=0.1, piece=256) as server, \
            log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-u", str(ROOT / "handler" / "handler.py"), "--test_input",
             json.dumps({"input": {"audio_url": server.url, "return_base64": True}})],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err,
            env=worker_env(WORK_DIR=str(work_dir), ALLOW_PRIVATE_URLS="1",
                           PROGRESS_INTERVAL_S="0.2"))
        try:
            wait_for(proc, lambda: any(work_dir.rglob("*.part")), "a partial download")
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 143
    assert log.read_text().strip().splitlines()[-1].startswith(
        "handler: interrupted by SIGTERM")
    assert_clean(work_dir)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_interrupted_mid_separation(sig: int, long_song: bytes, tmp_path: Path) -> None:
    song = tmp_path / "song.wav"
    song.write_bytes(long_song)
    scratch = tmp_path / "scratch"  # the CLI's temporary folder lives here (TMPDIR)
    scratch.mkdir()
    out, progress = tmp_path / "out", tmp_path / "progress.json"
    log = tmp_path / "stderr.log"

    def separating() -> bool:
        try:
            state = json.loads(progress.read_text())
        except (OSError, ValueError):
            return False
        return state.get("tasks", {}).get("inference") == "running" or \
            state.get("tasks", {}).get("models") == "done"

    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "handler.adapters.cli", "--input", str(song), "--output",
             str(out), "--progress-file", str(progress), "--quiet"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
            env=worker_env(TMPDIR=str(scratch)))
    try:
        wait_for(proc, separating, "separation")
        assert any(scratch.iterdir())
        proc.send_signal(sig)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    name = signal.Signals(sig).name
    lines = log.read_text().strip().splitlines()
    assert proc.returncode == 128 + sig, (proc.returncode, lines[-5:])
    assert lines[-1] == f"demucs-separate: interrupted by {name}; temporary files removed"
    assert not any(scratch.iterdir()), list(scratch.iterdir())
    assert not out.exists() or not any(out.iterdir())
    assert json.loads(progress.read_text())["state"] == "error"


# --- presigned PUT answered 200 without storing; tokens in URL paths --------------------


def put_job(url: str) -> dict[str, Any]:
    return {"id": "put", "input": {"audio_base64": b64(input_bytes(1.0)[0]),
                                   "output_urls": [url]}}


def test_put_answered_200_with_another_etag_is_upload_failed(
        http_server: LocalHTTPServer, work_dir: Path) -> None:
    url = http_server.route("/out/instrumental.mp3", Status(
        200, headers={"ETag": '"9e107d9d372bb6826bd81d3542a419d6"'}))
    run = run_in_process(put_job(url + "?X-Amz-Signature=deadbeef"))
    check_error(run, "UPLOAD_FAILED")
    message = run.final["error"]
    assert "its ETag (9e107d9d372bb6826bd81d3542a419d6) is not the MD5 of the uploaded file" \
        in message and "deadbeef" not in message, message
    assert http_server.hits("/out/instrumental.mp3") == 1
    assert_clean(work_dir)


@pytest.mark.parametrize("headers", [
    {},  # no digest at all: nothing to compare
    {"ETag": '"9e107d9d372bb6826bd81d3542a419d6-2"'},  # multipart
    {"ETag": '"0x8DCA0B1C2D3E4F5"'},  # Azure
    {"ETag": '"9e107d9d372bb6826bd81d3542a419d6"', "x-amz-server-side-encryption": "aws:kms"},
    {"ETag": 'W/"9e107d9d372bb6826bd81d3542a419d6"'},
], ids=["none", "multipart", "azure", "sse-kms", "weak"])
def test_put_etags_that_are_no_md5_are_not_judged(headers: dict[str, str],
                                                  http_server: LocalHTTPServer,
                                                  work_dir: Path) -> None:
    url = http_server.route("/out/i.mp3", Status(200, headers=headers))
    run = run_in_process(put_job(url))
    check_final(run.final, n_outputs=1)
    assert_clean(work_dir)


def test_put_etag_and_digests_compared(tmp_path: Path, http_server: LocalHTTPServer) -> None:
    """put_presigned against real responses: the right MD5 passes as ETag, x-goog-hash and
    Content-MD5; a wrong x-goog-hash fails even beside a matching ETag."""
    import base64
    import hashlib

    path = tmp_path / "stem.mp3"
    path.write_bytes(b"stem bytes " * 1000)
    md5 = hashlib.md5(path.read_bytes()).digest()
    good = [{"ETag": f'"{md5.hex()}"'}, {"ETag": f'"{md5.hex().upper()}"'},
            {"x-goog-hash": f"crc32c=AAAAAA==,md5={base64.b64encode(md5).decode()}"},
            {"Content-MD5": base64.b64encode(md5).decode()}]
    for i, headers in enumerate(good):
        put_presigned(http_server.route(f"/good{i}", Status(200, headers=headers)), path,
                      "audio/mpeg")
    wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    url = http_server.route("/bad", Status(200, headers={"ETag": f'"{md5.hex()}"',
                                                         "x-goog-hash": f"md5={wrong}"}))
    with pytest.raises(UploadFailed, match="its x-goog-hash .* is not the MD5"):
        put_presigned(url, path, "audio/mpeg")
    assert integrity.stored_md5({"ETag": "not-quoted-nonsense"}) is None


def test_put_to_s3_passes_the_etag_check(s3_server: Any, tmp_path: Path,
                                         fast_local_network: None) -> None:
    """A real S3 server (moto) answers a presigned PUT with the MD5 ETag: accepted, stored."""
    bucket = s3_server.create_bucket()
    client = s3_server.client()
    url = client.generate_presigned_url("put_object", Params={
        "Bucket": bucket, "Key": "stem.mp3", "ContentType": "audio/mpeg"}, ExpiresIn=600)
    path = tmp_path / "stem.mp3"
    path.write_bytes(os.urandom(200_000))
    put_presigned(url, path, "audio/mpeg")
    assert client.get_object(Bucket=bucket, Key="stem.mp3")["Body"].read() == path.read_bytes()


TOKEN = "AbCdEf0123456789sharetoken"


def test_tokens_in_url_paths_stay_out_of_logs(http_server: LocalHTTPServer, media: Media,
                                              work_dir: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Share links carry the token in the path: log lines show the host and a hash of the
    path (INFO: downloaded/uploaded, WARNING: retries)."""
    src = http_server.route(f"/s/{TOKEN}/song.wav", Status(500), Serve(media.wav_1s))
    dst = http_server.route(f"/s/{TOKEN}/out.mp3", Status(503), AcceptPut())
    caplog.set_level(logging.INFO)  # urllib3's DEBUG lines name the path; LOG_LEVEL is INFO
    run = run_in_process({"id": "share", "input": {"audio_url": src, "output_urls": [dst]}})
    check_final(run.final, n_outputs=1)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in text, text
    for line in (f"downloaded {len(media.wav_1s)} bytes from {log_url(src)}",
                 f"uploaded {len(http_server.uploads[f'/s/{TOKEN}/out.mp3'].body)} bytes to "
                 f"{log_url(dst)}"):
        assert line in text, text
    assert "download attempt 1/4 failed: HTTP 500 Internal Server Error from " \
           f"{log_url(src)}" in text, text
    assert "upload attempt 1/4 failed: HTTP 503 Service Unavailable from " \
           f"{log_url(dst)}" in text, text
    assert log_url(src).startswith(f"{http_server.base_url} (path sha256:")
    assert log_url(src) != log_url(dst)
    assert_clean(work_dir)
