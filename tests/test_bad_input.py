"""Bad input, case by case, through the worker's job handler in one process.

Every case must end with exactly one final item ``{"error": "CODE: message"}`` (the right
CODE, a message that says what was wrong, no progress item with an ``error`` key), leave
WORK_DIR empty, and the same process must go on serving: a good job runs after every few bad
ones and at the end. Then valid but awkward inputs that must succeed.

One case per code lives in test_worker_errors.py; this is the wide matrix. The sources are
real: a local HTTP server, s3rver (which, unlike moto, refuses expired presigned URLs), files
made with PyAV/soundfile, and the real spleeter_2stems model.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import requests
import soundfile as sf
from worker_helpers import (
    RATE,
    assert_clean,
    b64,
    check_audio,
    check_error,
    check_final,
    fetch,
    fresh_work_dir,
    input_bytes,
    run_in_process,
    write_input,
)

from devtools.servers import (
    Html,
    LocalHTTPServer,
    LocalS3rver,
    LyingLength,
    Redirect,
    Serve,
    Stall,
    Status,
)
from devtools.songs import audio_bytes

GOOD_EVERY = 8  # a good job after this many bad ones (and one at the end)
EXAMPLE = "https://example.com/song.wav"  # never fetched: validation fails first


# --- media ------------------------------------------------------------------------------


def video_without_audio() -> bytes:
    """A real MP4 with one MPEG-4 video stream and no audio."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20, np.uint8),
                                               format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    """(channels, n) float audio as 16-bit WAV."""
    return audio_bytes(audio, rate, "wav", "PCM_16")


@dataclass
class Media:
    wav_1s: bytes
    mp3_3s: bytes
    video: bytes
    noise: bytes
    empty_wav: bytes
    big: bytes  # 1.5 MB, over MAX_DOWNLOAD_MB=1


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Media:
    mp3 = tmp_path_factory.mktemp("media") / "song.mp3"
    write_input(mp3, 3.0, "mp3")
    return Media(
        wav_1s=input_bytes(1.0)[0],
        mp3_3s=mp3.read_bytes(),
        video=video_without_audio(),
        noise=np.random.default_rng(1).bytes(64 * 1024),
        empty_wav=wav_bytes(np.zeros((2, 0), np.float32), RATE),
        big=np.random.default_rng(2).bytes(1536 * 1024),
    )


# --- an S3 server that enforces expiry ------------------------------------------------------


@dataclass
class Expired:
    url: str  # presigned with ExpiresIn=1
    fresh: str  # the same object, presigned for an hour
    made: float  # time.monotonic() when signed


@pytest.fixture(scope="module")
def expired_url(media: Media) -> Any:
    missing = LocalS3rver.missing()
    if missing:
        pytest.skip(f"expired presigned URL: {missing} (moto does not check expiry)")
    server = LocalS3rver("inbox").start()
    try:
        client = server.client()
        client.put_object(Bucket="inbox", Key="uploads/song.wav", Body=media.wav_1s)
        params = {"Bucket": "inbox", "Key": "uploads/song.wav"}
        yield Expired(client.generate_presigned_url("get_object", Params=params, ExpiresIn=1),
                      client.generate_presigned_url("get_object", Params=params,
                                                    ExpiresIn=3600),
                      time.monotonic())
    finally:
        server.stop()


# --- the cases --------------------------------------------------------------------------


@dataclass
class Ctx:
    http: LocalHTTPServer
    media: Media
    request: pytest.FixtureRequest

    def serve(self, path: str, *responses: Any) -> str:
        return self.http.route(path, *responses)


@dataclass
class Case:
    id: str
    input: Callable[[Ctx], Any] | dict[str, Any]
    code: str
    message: str | tuple[str, ...]  # must appear in the error message
    env: dict[str, str] = field(default_factory=dict)
    after: Callable[[Ctx], None] | None = None  # extra checks
    job: dict[str, Any] = field(default_factory=dict)  # extra top-level job keys


def base64_in(ctx: Ctx, **extra: Any) -> dict[str, Any]:
    return {"audio_base64": b64(ctx.media.wav_1s), "return_base64": True, **extra}


def hits(path: str, n: int) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        assert ctx.http.hits(path) == n, f"{path}: {ctx.http.hits(path)} requests, expected {n}"
    return check


def local_url(path: str) -> Callable[[Ctx], dict[str, Any]]:
    """A URL of the local server serving the good clip: refused before any request."""
    return lambda ctx: {"audio_url": ctx.serve(path, Serve(ctx.media.wav_1s)) + "?sig=abc",
                        "return_base64": True}


NO_PRIVATE = {"ALLOW_PRIVATE_URLS": "false"}
METADATA = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


def expired(ctx: Ctx) -> dict[str, Any]:
    exp: Expired = ctx.request.getfixturevalue("expired_url")
    time.sleep(max(0.0, exp.made + 2.2 - time.monotonic()))  # 1 s expiry, 1 s resolution
    assert requests.get(exp.fresh, timeout=10).status_code == 200  # the object is there
    return {"audio_url": exp.url, "return_base64": True}


CASES = [
    # --- schema -------------------------------------------------------------------------
    Case("input-not-object", lambda ctx: "https://example.com/a.wav", "INVALID_INPUT",
         "job input must be a JSON object"),
    Case("no-source", {"return_base64": True}, "INVALID_INPUT",
         "exactly one audio source: audio_url, audio_base64, s3_uri or an S3 event (found: none)"),
    Case("empty-source", {"audio_base64": "", "return_base64": True}, "INVALID_INPUT",
         "(found: none)"),
    Case("two-sources", lambda ctx: base64_in(ctx, audio_url=EXAMPLE), "INVALID_INPUT",
         "(found: audio_url, audio_base64)"),
    Case("unknown-key", lambda ctx: base64_in(ctx, volume=11), "INVALID_INPUT",
         "volume: unknown field"),
    Case("unknown-keys-listed", lambda ctx: base64_in(ctx, url=EXAMPLE, format="wav"),
         "INVALID_INPUT", "url: unknown field; format: unknown field"),
    Case("url-wrong-type", {"audio_url": 42, "return_base64": True}, "INVALID_INPUT",
         "audio_url: Input should be a valid string"),
    Case("stems-wrong-type", lambda ctx: base64_in(ctx, stems=5), "INVALID_INPUT",
         "stems: Input should be a valid list"),
    Case("shifts-wrong-type", lambda ctx: base64_in(ctx, shifts="many"), "INVALID_INPUT",
         "shifts: Input should be a valid integer"),
    Case("bool-wrong-type", lambda ctx: base64_in(ctx, return_base64="please"),
         "INVALID_INPUT", "return_base64: Input should be a valid boolean"),
    Case("shifts-too-many", lambda ctx: base64_in(ctx, shifts=21), "INVALID_INPUT",
         "shifts: Input should be less than or equal to 20"),
    Case("shifts-negative", lambda ctx: base64_in(ctx, shifts=-1), "INVALID_INPUT",
         "shifts: Input should be greater than or equal to 0"),
    Case("overlap-too-big", lambda ctx: base64_in(ctx, overlap=0.99), "INVALID_INPUT",
         "overlap: Input should be less than or equal to 0.95"),
    Case("overlap-negative", lambda ctx: base64_in(ctx, overlap=-0.1), "INVALID_INPUT",
         "overlap: Input should be greater than or equal to 0"),
    Case("bitrate-not-mp3-rate", lambda ctx: base64_in(ctx, mp3_bitrate=100), "INVALID_INPUT",
         "mp3_bitrate: Value error, must be one of 32, 40, 48"),
    Case("bitrate-too-high", lambda ctx: base64_in(ctx, mp3_bitrate=512), "INVALID_INPUT",
         "mp3_bitrate: Value error, must be one of"),
    Case("channels-3", lambda ctx: base64_in(ctx, channels=3), "INVALID_INPUT",
         "channels: Input should be 1 or 2"),
    Case("format-ogg", lambda ctx: base64_in(ctx, output_format="ogg"), "INVALID_INPUT",
         "output_format: Input should be 'mp3', 'wav' or 'flac'"),
    Case("segment-too-short", lambda ctx: base64_in(ctx, segment=0.1), "INVALID_INPUT",
         "segment: Input should be greater than 0.5"),
    Case("negative-cut", lambda ctx: base64_in(ctx, interval_cut=[-5]), "INVALID_INPUT",
         "interval_cut.0: Input should be greater than 0"),
    Case("unknown-model", lambda ctx: base64_in(ctx, model="htdemucs_9s"), "INVALID_INPUT",
         "unknown model 'htdemucs_9s'; known models: spleeter_2stems, htdemucs"),
    Case("unknown-stem", lambda ctx: base64_in(ctx, stems="vocals,kazoo"), "INVALID_INPUT",
         "model spleeter_2stems has no stem 'kazoo'; it offers: instrumental, vocals, "
         "accompaniment"),
    Case("stem-not-in-model", lambda ctx: base64_in(ctx, stems=["drums", "bass"]),
         "INVALID_INPUT", "model spleeter_2stems has no stem 'drums', 'bass'"),
    Case("no-stems", lambda ctx: base64_in(ctx, stems=[]), "INVALID_INPUT",
         "stems must name at least one stem"),
    Case("two-destinations", lambda ctx: base64_in(ctx, output_urls=[EXAMPLE]),
         "INVALID_INPUT", "give at most one of output_urls and return_base64"),
    Case("s3config-no-secret", lambda ctx: base64_in(ctx, return_base64=False),
         "INVALID_INPUT", "s3Config: accessSecret: Field required",
         job={"s3Config": {"accessId": "AKIAEXAMPLEEXAMPLE", "bucketName": "b"}}),
    # --- URLs that are not http(s) ------------------------------------------------------
    Case("file-url", {"audio_url": "file:///etc/passwd", "return_base64": True},
         "INVALID_INPUT", "audio_url must be an http(s) URL"),
    Case("ftp-url", {"audio_url": "ftp://example.com/song.mp3", "return_base64": True},
         "INVALID_INPUT", "audio_url must be an http(s) URL"),
    Case("s3-in-audio-url", {"audio_url": "s3://bucket/song.mp3", "return_base64": True},
         "INVALID_INPUT", "(use s3_uri for s3:// objects)"),
    Case("s3-uri-no-key", {"s3_uri": "s3://bucket/"}, "INVALID_INPUT",
         "S3 URI names no object: s3://bucket/", env={"BUCKET_NAME": "out"}),
    Case("s3-uri-not-s3", {"s3_uri": EXAMPLE}, "INVALID_INPUT",
         "expected an s3://bucket/key URI", env={"BUCKET_NAME": "out"}),
    Case("output-url-ftp", lambda ctx: {"audio_base64": b64(ctx.media.wav_1s),
                                        "output_urls": ["ftp://example.com/out.mp3"]},
         "INVALID_INPUT", "output_urls: only http(s) URLs are accepted, got ftp scheme"),
    # --- blocked addresses (no ALLOW_PRIVATE_URLS) --------------------------------------
    Case("loopback", local_url("/loopback.wav"), "INVALID_INPUT",
         "URL host '127.0.0.1' resolves to a loopback address", env=NO_PRIVATE,
         after=hits("/loopback.wav", 0)),
    Case("localhost-name", lambda ctx: {
        "audio_url": ctx.serve("/name.wav", Serve(ctx.media.wav_1s)).replace(
            "127.0.0.1", "localhost"), "return_base64": True},
         "INVALID_INPUT", "URL host 'localhost' resolves to a loopback address",
         env=NO_PRIVATE, after=hits("/name.wav", 0)),
    Case("decimal-loopback", lambda ctx: {
        "audio_url": ctx.serve("/dec.wav", Serve(ctx.media.wav_1s)).replace(
            "127.0.0.1", "2130706433"), "return_base64": True},
         "INVALID_INPUT", "resolves to a loopback address", env=NO_PRIVATE,
         after=hits("/dec.wav", 0)),
    Case("private-10", {"audio_url": "http://10.1.2.3/song.wav", "return_base64": True},
         "INVALID_INPUT", "URL host '10.1.2.3' resolves to a private address", env=NO_PRIVATE),
    Case("private-192", {"audio_url": "http://192.168.0.10:9000/b/k", "return_base64": True},
         "INVALID_INPUT", "resolves to a private address", env=NO_PRIVATE),
    Case("ipv6-loopback", {"audio_url": "http://[::1]:8080/a.wav", "return_base64": True},
         "INVALID_INPUT", "resolves to a loopback address", env=NO_PRIVATE),
    Case("mapped-loopback", {"audio_url": "http://[::ffff:127.0.0.1]/a.wav",
                             "return_base64": True},
         "INVALID_INPUT", "resolves to a loopback address", env=NO_PRIVATE),
    Case("metadata", {"audio_url": METADATA, "return_base64": True}, "INVALID_INPUT",
         "resolves to a link-local / cloud metadata address", env=NO_PRIVATE),
    # --- metadata addresses stay refused with ALLOW_PRIVATE_URLS=true -------------------
    Case("metadata-allowed-private", {"audio_url": METADATA, "return_base64": True},
         "INVALID_INPUT", "URL host '169.254.169.254' resolves to a link-local / cloud "
         "metadata address: http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
    Case("metadata-name", {"audio_url": "http://metadata.google.internal/computeMetadata/v1/",
                           "return_base64": True},
         "INVALID_INPUT", "URL points to a cloud metadata service"),
    Case("metadata-mapped-v6", {"audio_url": "http://[::ffff:169.254.169.254]/latest/",
                                "return_base64": True},
         "INVALID_INPUT", "link-local / cloud metadata address"),
    Case("metadata-alibaba", {"audio_url": "http://100.100.100.200/latest/meta-data/",
                              "return_base64": True},
         "INVALID_INPUT", "link-local / cloud metadata address"),
    Case("redirect-to-metadata", lambda ctx: {
        "audio_url": ctx.serve("/r", Redirect(METADATA)), "return_base64": True},
         "INVALID_INPUT", "resolves to a link-local / cloud metadata address",
         after=hits("/r", 1)),
    Case("redirect-chain-to-metadata", lambda ctx: {
        "audio_url": ctx.serve("/r1", Redirect(ctx.serve("/r2", Redirect(
            "http://[::ffff:a9fe:a9fe]/latest/", code=307)), code=301)),
        "return_base64": True},
         "INVALID_INPUT", "link-local / cloud metadata address",
         after=lambda ctx: (hits("/r1", 1)(ctx), hits("/r2", 1)(ctx))),
    Case("redirect-to-file", lambda ctx: {
        "audio_url": ctx.serve("/rf", Redirect("file:///etc/passwd")), "return_base64": True},
         "INVALID_INPUT", "only http(s) URLs are accepted, got file scheme"),
    Case("output-url-metadata", lambda ctx: {"audio_base64": b64(ctx.media.wav_1s),
                                             "output_urls": {"instrumental": METADATA}},
         "INVALID_INPUT", "output_urls: URL host is a link-local / cloud metadata address"),
    Case("s3config-endpoint-metadata", lambda ctx: {"audio_base64": b64(ctx.media.wav_1s)},
         "INVALID_INPUT", "link-local / cloud metadata address",
         job={"s3Config": {"accessId": "AKIAEXAMPLEEXAMPLE", "accessSecret": "x" * 40,
                           "bucketName": "b", "endpointUrl": "http://169.254.169.254/"}}),
    # --- HTTP failures ------------------------------------------------------------------
    Case("http-403", lambda ctx: {"audio_url": ctx.serve("/403", Status(403)) + "?X-Amz-"
                                  "Signature=deadbeef", "return_base64": True},
         "DOWNLOAD_FAILED", "HTTP 403 Forbidden from http://127.0.0.1:", after=hits("/403", 1)),
    Case("http-404", lambda ctx: {"audio_url": ctx.serve("/404", Status(404)),
                                  "return_base64": True},
         "DOWNLOAD_FAILED", "HTTP 404 Not Found from", after=hits("/404", 1)),
    Case("http-500", lambda ctx: {"audio_url": ctx.serve("/500", Status(500)),
                                  "return_base64": True},
         "DOWNLOAD_FAILED", "HTTP 500 Internal Server Error from", after=hits("/500", 4)),
    Case("http-410-s3-xml", lambda ctx: {"audio_url": ctx.serve("/410", Status(
        410, b"<?xml version='1.0'?><Error><Code>NoSuchKey</Code><Message>The specified "
             b"key does not exist.</Message><SignatureProvided>abc</SignatureProvided>"
             b"</Error>")), "return_base64": True},
         "DOWNLOAD_FAILED", ("HTTP 410 Gone from http://127.0.0.1:",
                             "/410 (NoSuchKey: The specified key does not exist.)")),
    Case("expired-presigned", expired, "DOWNLOAD_FAILED",
         ("HTTP 403 Forbidden from http://127.0.0.1:",
          "/inbox/uploads/song.wav (AccessDenied: Request has expired)")),
    Case("stall", lambda ctx: {"audio_url": ctx.serve("/stall", Stall(
        ctx.media.wav_1s, delay_s=30, after_bytes=1000)), "return_base64": True},
         "DOWNLOAD_FAILED", "timed out: no data for 0.5s from", env={"DOWNLOAD_TIMEOUT_S": "0.5"},
         after=hits("/stall", 1)),
    Case("too-big-declared", lambda ctx: {"audio_url": ctx.serve("/big", Serve(ctx.media.big)),
                                          "return_base64": True},
         "DOWNLOAD_FAILED", "file is larger than the 1 MB limit (Content-Length: 1572864 bytes)",
         env={"MAX_DOWNLOAD_MB": "1"}),
    Case("too-big-streamed", lambda ctx: {
        "audio_url": ctx.serve("/big-nolen", Serve(ctx.media.big, length=False)),
        "return_base64": True},
         "DOWNLOAD_FAILED", "download is larger than the 1 MB limit (stopped after",
         env={"MAX_DOWNLOAD_MB": "1"}),
    Case("lying-length", lambda ctx: {"audio_url": ctx.serve("/lie", LyingLength(
        ctx.media.wav_1s, declared=len(ctx.media.wav_1s) + 5000)), "return_base64": True},
         "DOWNLOAD_FAILED",
         ("incomplete body from http://127.0.0.1:", "(gave up after 4 attempts)"),
         after=hits("/lie", 4)),
    Case("empty-body", lambda ctx: {"audio_url": ctx.serve("/empty", Serve(b"")),
                                    "return_base64": True},
         "DOWNLOAD_FAILED", "empty response body (HTTP 200)"),
    # --- not audio ----------------------------------------------------------------------
    Case("random-bytes", lambda ctx: {"audio_url": ctx.serve("/noise.mp3", Serve(
        ctx.media.noise, "audio/mpeg")), "return_base64": True},
         "UNSUPPORTED_AUDIO", "not a decodable audio or video file"),
    Case("html-200", lambda ctx: {"audio_url": ctx.serve("/share/song.mp3", Html(
        "<!doctype html><html><head><title>Error</title></head><body><h1>Link expired"
        "</h1></body></html>")), "return_base64": True},
         "UNSUPPORTED_AUDIO", "not a decodable audio or video file"),
    Case("video-no-audio", lambda ctx: {"audio_base64": b64(ctx.media.video),
                                        "return_base64": True},
         "UNSUPPORTED_AUDIO", "the file has no audio track (found: video)"),
    Case("wav-no-samples", lambda ctx: {"audio_base64": b64(ctx.media.empty_wav),
                                        "return_base64": True},
         "UNSUPPORTED_AUDIO", "the audio track is empty"),
    Case("too-long", lambda ctx: {"audio_url": ctx.serve("/long.mp3", Serve(
        ctx.media.mp3_3s)), "return_base64": True},
         "TOO_LONG", "input is 3 s long; the limit is 1 s", env={"MAX_DURATION_S": "1"}),
    # --- base64 -------------------------------------------------------------------------
    Case("base64-too-big", lambda ctx: {"audio_base64": b64(ctx.media.big),
                                        "return_base64": True},
         "INVALID_INPUT", "audio_base64 is larger than the 1 MB limit; upload the file and "
         "pass audio_url instead", env={"MAX_BASE64_INPUT_MB": "1"}),
    Case("base64-not-base64", {"audio_base64": "Ünïcode is not base64 ✓", "return_base64": True},
         "INVALID_INPUT", "audio_base64 is not valid base64"),
    Case("base64-data-uri-not-base64", {"audio_base64": "data:audio/wav,RIFF....WAVEfmt",
                                        "return_base64": True},
         "INVALID_INPUT", "audio_base64: data URI must be base64-encoded"),
    Case("base64-padding-only", {"audio_base64": "====", "return_base64": True},
         "INVALID_INPUT", "audio_base64"),
]


# --- running the matrix -----------------------------------------------------------------


class Served:
    """Bad jobs since the last good one; runs the good job that proves the worker serves."""

    def __init__(self, wav: bytes) -> None:
        self.wav = wav
        self.bad = 0
        self.good = 0

    def good_job(self, work: Path) -> None:
        data, samples = self.wav, RATE
        run = run_in_process({"id": f"good-{self.good}", "input": {
            "audio_base64": b64(data), "return_base64": True}})
        check_final(run.final, n_outputs=1)
        out = run.final["outputs"][0]
        check_audio(fetch(out["url"]), out, samples=samples, channels=1)
        assert_clean(work)
        self.good += 1
        self.bad = 0


@pytest.fixture(scope="module")
def served(media: Media) -> Served:
    return Served(media.wav_1s)


@pytest.fixture(autouse=True)
def work_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fast_local_network: None) -> Path:
    return fresh_work_dir(monkeypatch, tmp_path, "DEFAULT_MODEL", "MAX_DURATION_S", "MODELS_DIR",
                          "MAX_DOWNLOAD_MB", "MAX_BASE64_INPUT_MB", "PROGRESS_INTERVAL_S",
                          keep_bucket=False)


def test_matrix_is_wide() -> None:
    codes = {c.code for c in CASES}
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    assert codes == {"INVALID_INPUT", "DOWNLOAD_FAILED", "UNSUPPORTED_AUDIO", "TOO_LONG"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, http_server: LocalHTTPServer, media: Media, served: Served,
                   work_dir: Path, monkeypatch: pytest.MonkeyPatch,
                   request: pytest.FixtureRequest) -> None:
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    ctx = Ctx(http_server, media, request)
    job_input = case.input(ctx) if callable(case.input) else case.input

    started = time.monotonic()
    run = run_in_process({"id": f"bad-{case.id}", "input": job_input, **case.job})

    check_error(run, case.code)
    message = run.final["error"]
    for part in (case.message,) if isinstance(case.message, str) else case.message:
        assert part in message, message
    assert len(message) < 600, message
    # The caller's query string (a presigned signature) is never echoed.
    assert "?" not in message and "deadbeef" not in message and "sig=abc" not in message
    assert "X-Amz-Signature" not in message and "SignatureProvided" not in message
    assert time.monotonic() - started < 20
    if case.after is not None:
        case.after(ctx)
    assert_clean(work_dir)

    served.bad += 1
    if served.bad >= GOOD_EVERY:
        for name in case.env:
            monkeypatch.delenv(name)
        served.good_job(work_dir)


def test_still_serving_after_the_matrix(served: Served, work_dir: Path) -> None:
    served.good_job(work_dir)


# --- valid but awkward inputs: these must succeed -----------------------------------------


def silence() -> tuple[bytes, int]:
    return wav_bytes(np.zeros((2, 2 * RATE), np.float32), RATE), 2 * RATE


def one_second() -> tuple[bytes, int]:
    return input_bytes(1.0)


def narrowband_mono() -> tuple[bytes, int]:
    t = np.arange(8000 * 2) / 8000
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    return wav_bytes(tone[None, :].astype(np.float32), 8000), 2 * RATE  # 2 s at 44.1 kHz


def tiny() -> tuple[bytes, int]:
    audio = input_bytes(1.0)
    data, _ = sf.read(io.BytesIO(audio[0]), dtype="float32", always_2d=True)
    return wav_bytes(data[:2205].T, RATE), 2205  # 50 ms


AWKWARD = {"silence": silence, "one-second": one_second, "8khz-mono": narrowband_mono,
           "50ms": tiny}


@pytest.mark.parametrize("make", AWKWARD.values(), ids=AWKWARD.keys())
def test_awkward_but_valid_input_succeeds(make: Callable[[], tuple[bytes, int]],
                                          work_dir: Path) -> None:
    data, samples = make()
    run = run_in_process({"id": "awkward", "input": {
        "audio_base64": b64(data), "return_base64": True, "stems": "instrumental,vocals",
        "output_format": "wav", "channels": 2}})
    check_final(run.final, n_outputs=2)
    assert "warnings" not in run.final
    for out in run.final["outputs"]:
        check_audio(fetch(out["url"]), out, samples=samples, channels=2)
    assert_clean(work_dir)


def test_silence_separates_to_silence(work_dir: Path) -> None:
    data, _ = silence()
    run = run_in_process({"id": "silence", "input": {
        "audio_base64": b64(data), "return_base64": True, "stems": "all",
        "output_format": "wav"}})
    check_final(run.final, n_outputs=2)  # vocals, instrumental (= accompaniment, once)
    for out in run.final["outputs"]:
        audio, _ = sf.read(io.BytesIO(fetch(out["url"])), dtype="float32")
        assert np.all(np.isfinite(audio)) and np.abs(audio).max() < 1e-3, out["stem"]


def test_truncated_mp3_separates_what_decodes_and_warns(media: Media, work_dir: Path) -> None:
    cut = media.mp3_3s[: int(len(media.mp3_3s) * 0.6)]  # an interrupted copy of a 3 s file
    with av.open(io.BytesIO(cut)) as container:  # it decodes without any error ...
        stream = container.streams.audio[0]
        decoded = sum(f.samples for f in container.decode(stream))
    assert RATE < decoded < int(2.5 * RATE)

    run = run_in_process({"id": "truncated", "input": {
        "audio_base64": b64(cut), "return_base64": True, "output_format": "wav"}})

    check_final(run.final, n_outputs=1)
    # ... so only the header's length (LAME/Xing frame count) tells; the result says so.
    (warning,) = run.final["warnings"]
    assert warning.startswith("input is damaged or truncated: "), warning
    assert "3.00 s" in warning and f"{run.final['input_duration_s']:.2f} s" in warning, warning
    out = run.final["outputs"][0]
    got = check_audio(fetch(out["url"]), out, samples=round(run.final["input_duration_s"] * RATE),
                      channels=1)
    assert abs(got.samples - decoded) <= 1152 * 2  # the MP3 decoder's priming, at most
    assert_clean(work_dir)


def test_damaged_mp3_warns(media: Media, work_dir: Path) -> None:
    data = bytearray(media.mp3_3s)
    middle = len(data) // 2
    data[middle:middle + 3000] = np.random.default_rng(3).bytes(3000)

    run = run_in_process({"id": "damaged", "input": {"audio_base64": b64(bytes(data)),
                                                     "return_base64": True}})

    check_final(run.final, n_outputs=1)
    assert len(run.final["warnings"]) == 1
    assert run.final["warnings"][0].startswith("input is damaged or truncated: ")
    assert 0.5 < run.final["input_duration_s"] < 3.0
    assert_clean(work_dir)
