"""Helpers for the worker tests (test_worker_*.py): input audio, in-process jobs, decoding
what a job returned, and the runpod SDK's local API server as a subprocess."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import requests

from devtools.net import free_port
from devtools.songs import audio_bytes, make_mixture, write_audio

ROOT = Path(__file__).resolve().parent.parent
RATE = 44100  # the input rate, and spleeter_2stems's output rate
STAGES = ("download", "decode", "separate", "encode", "upload")
OUTPUT_FIELDS = {"stem", "url", "key", "format", "channels", "sample_rate", "bitrate",
                 "duration_s", "bytes"}


# --- input audio ------------------------------------------------------------------------


def input_audio(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """A stereo (2, n) float32 synthetic song at 44.1 kHz."""
    return make_mixture(seconds, seed=seed)["mixture"]


def write_input(path: Path, seconds: float = 2.0, fmt: str = "wav", seed: int = 0) -> int:
    """Write a synthetic song to ``path`` (wav/flac via soundfile, mp3 via the worker's own
    gapless writer); returns its length in samples."""
    return write_audio(path, input_audio(seconds, seed), RATE, fmt)


def input_bytes(seconds: float = 2.0, fmt: str = "wav", seed: int = 0) -> tuple[bytes, int]:
    """(file bytes, samples) of a synthetic song."""
    audio = input_audio(seconds, seed)
    return audio_bytes(audio, RATE, fmt), audio.shape[1]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- running a job in-process -----------------------------------------------------------


@dataclass
class JobRun:
    progress: list[dict]
    final: dict

    @property
    def error(self) -> str | None:
        return self.final.get("error")


def run_in_process(job: dict) -> JobRun:
    """Iterate ``runner.run_job(job)`` to the end; split progress items from the final
    one, checking that every item before the last is a progress item."""
    from handler.service.runner import run_job

    items = list(run_job(job))
    assert items, "the job yielded nothing"
    for item in items[:-1]:
        assert item.get("status") == "progress", f"non-progress item before the last: {item}"
    assert items[-1].get("status") != "progress", "the last item is a progress item"
    return JobRun(items[:-1], items[-1])


def check_progress(items: list[dict]) -> None:
    """Every item: status progress, a known stage, progress in [0, 1] and never going back,
    no ``error`` key (RunPod fails a job on the first item that has one)."""
    assert items, "no progress items"
    last = 0.0
    for item in items:
        assert item["status"] == "progress", item
        assert "error" not in item, item
        assert item["stage"] in STAGES, item
        assert 0.0 <= item["progress"] <= 1.0, item
        assert item["progress"] >= last, f"progress went back: {items}"
        last = item["progress"]
    assert items[0]["stage"] == "download"


def check_final(final: dict, *, n_outputs: int, model: str = "spleeter_2stems") -> None:
    """The documented fields of a completed result."""
    assert "error" not in final, final
    assert final["status"] == "completed"
    assert final["model"] == model
    assert isinstance(final["input_duration_s"], float) and final["input_duration_s"] > 0
    assert {"download", "separate", "upload", "total"} <= set(final["timings_s"])
    assert all(v >= 0 for v in final["timings_s"].values())
    assert len(final["outputs"]) == n_outputs, final["outputs"]
    for out in final["outputs"]:
        assert set(out) >= OUTPUT_FIELDS, out
        assert out["bytes"] > 0
    assert final["audio_url"] == final["outputs"][0]["url"]


def check_error(run: JobRun, code: str) -> None:
    """The job failed with exactly one final ``{"error": "CODE: ..."}`` item."""
    assert set(run.final) == {"error"}, run.final
    assert run.final["error"].startswith(f"{code}: "), run.final["error"]
    for item in run.progress:
        assert "error" not in item


# --- what a job returned ----------------------------------------------------------------


@dataclass
class Decoded:
    samples: int  # per channel
    channels: int
    sample_rate: int
    codec: str


def fetch(url: str) -> bytes:
    """The bytes behind a result URL: a data URI or an http(s) (presigned) URL."""
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        assert header.endswith(";base64"), header
        return base64.b64decode(data, validate=True)
    resp = requests.get(url, timeout=30)
    assert resp.status_code == 200, f"HTTP {resp.status_code} for {url}"
    return resp.content


def decode(data: bytes) -> Decoded:
    """Decode a whole file with PyAV (FFmpeg): sample count, channels, rate, codec."""
    samples = 0
    channels = rate = 0
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        codec = stream.codec_context.name
        for frame in container.decode(stream):
            samples += frame.samples
            channels = len(frame.layout.channels)
            rate = frame.sample_rate
    return Decoded(samples, channels, rate, codec)


CODECS = {"mp3": ("mp3", "mp3float"), "wav": ("pcm_s16le", "pcm_f32le", "pcm_s24le"),
          "flac": ("flac",)}


def check_audio(data: bytes, output: dict, *, samples: int, channels: int) -> Decoded:
    """The file decodes to exactly ``samples`` samples of ``channels`` channels at 44.1 kHz,
    as its result entry says."""
    got = decode(data)
    assert got.codec in CODECS[output["format"]], (got.codec, output["format"])
    assert got.sample_rate == RATE == output["sample_rate"]
    assert got.channels == channels == output["channels"]
    assert got.samples == samples, f"{got.samples} samples, expected {samples}"
    assert output["duration_s"] == round(samples / RATE, 6)
    assert output["bytes"] == len(data)
    return got


# --- the runpod SDK's local API server ------------------------------------------------


class ApiServer:
    """``python handler/handler.py --rp_serve_api`` on 127.0.0.1: the SDK's FastAPI server
    (``/runsync``, ``/run``, ``/status/{id}``, ``/stream/{id}``) running our handler in the
    SDK's own job loop. Started in its own process group, so stop() also ends the SDK's
    heartbeat child."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> ApiServer:
        log = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", str(ROOT / "handler" / "handler.py"), "--rp_serve_api",
                 "--rp_api_host", "127.0.0.1", "--rp_api_port", str(self.port)],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API server exited {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/docs", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the API server did not start in {timeout_s} s:\n{self.log()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def post(self, path: str, body: dict | None = None, timeout_s: float = 120.0) -> dict:
        resp = requests.post(self.url + path, json=body, timeout=timeout_s)
        assert resp.status_code == 200, f"{resp.status_code}: {resp.text[:500]}\n{self.log()}"
        return resp.json()

    def runsync(self, job_input: dict) -> list[Any]:
        """POST /runsync; returns the aggregated output (every item the handler yielded)."""
        body = self.post("/runsync", {"input": job_input})
        assert body["status"] == "COMPLETED", body
        assert isinstance(body["output"], list), body
        return body["output"]


@contextmanager
def api_server(env: dict[str, str], log_path: Path) -> Iterator[ApiServer]:
    server = ApiServer(env, log_path)
    try:
        yield server.start()
    finally:
        server.stop()


def worker_env(**extra: str) -> dict[str, str]:
    """The current environment for a worker subprocess, plus ``extra``; no deployment
    variables, the repository importable, one torch thread (the test machine is shared)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RUNPOD_WEBHOOK", "RUNPOD_REALTIME", "BUCKET_"))}
    env.update(PYTHONPATH=str(ROOT), TORCH_THREADS="1", LOG_LEVEL="WARNING")
    env.update(extra)
    return env


def split_output(output: list[Any]) -> tuple[list[dict], dict]:
    """An aggregated stream: (progress items, the final item)."""
    assert output, "empty output"
    return output[:-1], output[-1]


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def fresh_work_dir(monkeypatch: Any, tmp_path: Path, *unset: str,
                   keep_bucket: bool = True) -> Path:
    """A clean WORK_DIR for in-process jobs, with ``unset`` settings removed (and every
    BUCKET_* one unless ``keep_bucket``)."""
    for name in unset:
        monkeypatch.delenv(name, raising=False)
    if not keep_bucket:
        for name in [n for n in os.environ if n.startswith("BUCKET_")]:
            monkeypatch.delenv(name)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("WORK_DIR", str(work))
    return work


def assert_clean(work: Path) -> None:
    left = list(work.iterdir())
    assert not left, f"temp files left in WORK_DIR: {left}"


def run_good_job(work: Path, good_input: tuple[bytes, int]) -> None:
    """A good job right after a failed one: the process is still healthy."""
    data, samples = good_input
    run = run_in_process({"id": "good", "input": {"audio_base64": b64(data),
                                                  "return_base64": True}})
    check_final(run.final, n_outputs=1)
    out = run.final["outputs"][0]
    check_audio(fetch(out["url"]), out, samples=samples, channels=1)
    assert_clean(work)
