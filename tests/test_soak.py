"""Soak: many short jobs in a row in ONE worker process, through the runpod SDK's job loop.

The worker runs as deployed for local testing (``handler.py --rp_serve_api``: the SDK's
FastAPI server and its real job loop); jobs go in by ``/runsync``, base64 in and out. Over
SOAK_JOBS jobs (default 200) the worker process must not grow in memory (RSS of the last ten
jobs vs the first ten), in open file descriptors or threads, must leave nothing in WORK_DIR
and must load its model exactly once.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import psutil
import pytest
from worker_helpers import ApiServer, b64, check_audio, fetch, input_bytes, worker_env

SOAK_JOBS = int(os.environ.get("SOAK_JOBS", "200"))
WINDOW = 10  # jobs averaged at the start and at the end
RSS_GROWTH_LIMIT_MB = 40.0  # measured: see the README's Reliability section
# Jobs cycle through these: formats, stems and lengths (0.5-1 s), so every writer runs.
VARIANTS = [
    {"output_format": "mp3", "stems": "instrumental"},
    {"output_format": "wav", "stems": "vocals", "channels": 2},
    {"output_format": "flac", "stems": "instrumental,vocals"},
    {"output_format": "mp3", "stems": "all", "mp3_bitrate": 128, "channels": 2},
]


def wav(seconds: float, seed: int) -> tuple[bytes, int]:
    return input_bytes(seconds, "wav", seed)


@pytest.mark.soak
def test_soak(tmp_path: Path) -> None:
    assert SOAK_JOBS >= 2 * WINDOW, "SOAK_JOBS must be at least 20"
    work = tmp_path / "work"
    work.mkdir()
    inputs = [wav(0.5 + 0.25 * (i % 3), seed=i) for i in range(6)]
    env = worker_env(WORK_DIR=str(work), MODELS_DIR=str(tmp_path / "models"),
                     LOG_LEVEL="INFO")
    server = ApiServer(env, tmp_path / "server.log")
    server.start()
    try:
        proc = psutil.Process(server.proc.pid)
        rss_mb: list[float] = []
        fds: list[int] = []
        threads: list[int] = []
        started = time.monotonic()
        for i in range(SOAK_JOBS):
            data, samples = inputs[i % len(inputs)]
            variant = VARIANTS[i % len(VARIANTS)]
            body = server.post("/runsync", {"input": {
                "audio_base64": b64(data), "return_base64": True, **variant}})
            assert body["status"] == "COMPLETED", body
            final = body["output"][-1]
            assert final.get("status") == "completed", (i, final)
            assert all("error" not in item for item in body["output"])
            if i % 25 == 0 or i == SOAK_JOBS - 1:  # decode some outputs fully
                for out in final["outputs"]:
                    check_audio(fetch(out["url"]), out, samples=samples,
                                channels=variant.get("channels", 1))
            rss_mb.append(proc.memory_info().rss / 2**20)
            fds.append(proc.num_fds())
            threads.append(proc.num_threads())
        elapsed = time.monotonic() - started
        log = (tmp_path / "server.log").read_text(errors="replace")
        left = list(work.iterdir())
    finally:
        server.stop()

    first, last = rss_mb[:WINDOW], rss_mb[-WINDOW:]
    growth = statistics.median(last) - statistics.median(first)
    print(f"\nsoak: {SOAK_JOBS} jobs in {elapsed:.1f} s ({elapsed / SOAK_JOBS:.2f} s/job); "
          f"RSS first {WINDOW} {min(first):.0f}-{max(first):.0f} MB, last {WINDOW} "
          f"{min(last):.0f}-{max(last):.0f} MB (median growth {growth:+.1f} MB), "
          f"max {max(rss_mb):.0f} MB; fds {fds[0]} -> {fds[-1]} (max {max(fds)}); "
          f"threads {threads[0]} -> {threads[-1]} (max {max(threads)})")
    assert not left, f"temp files left in WORK_DIR: {left}"
    assert growth < RSS_GROWTH_LIMIT_MB, (first, last)
    assert max(last) - max(first) < RSS_GROWTH_LIMIT_MB, (first, last)
    assert max(fds[-WINDOW:]) <= max(fds[:WINDOW]) + 2, fds
    assert max(threads[-WINDOW:]) <= max(threads[:WINDOW]) + 2, threads
    assert log.count("loaded model ") == 1, log[-3000:]
    assert "loaded model spleeter_2stems" in log
    assert "Traceback" not in log, log[-3000:]
