"""Soak: 100 short jobs in a row through ONE HTTP service process (``python -m
handler.server``), base64 in, results kept on its disk and downloaded. Over the run the
process must not grow in memory (RSS of the last ten jobs vs the first ten after warm-up),
threads or open files, and must leave nothing in WORK_DIR."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import psutil
import pytest
from server_helpers import ProcServer
from worker_helpers import b64, check_audio, fetch, input_bytes

SOAK_JOBS = int(os.environ.get("SERVER_SOAK_JOBS", "100"))
WINDOW = 10
RSS_GROWTH_LIMIT_MB = 40.0  # the worker soak's limit (test_soak.py)
VARIANTS = [
    {"output_format": "mp3", "stems": "instrumental"},
    {"output_format": "wav", "stems": "vocals", "channels": 2},
    {"output_format": "flac", "stems": "instrumental,vocals"},
]


@pytest.mark.soak
def test_server_soak(tmp_path: Path) -> None:
    assert SOAK_JOBS >= 2 * WINDOW + 5
    work = tmp_path / "work"
    work.mkdir()
    inputs = [input_bytes(0.5 + 0.25 * (i % 2), seed=i) for i in range(4)]
    server = ProcServer(tmp_path / "data", tmp_path / "server.log", WORK_DIR=str(work),
                        LOG_LEVEL="WARNING").start()
    try:
        assert server.proc is not None
        proc = psutil.Process(server.proc.pid)
        c = server.client()
        rss, threads, fds, seconds = [], [], [], []
        started = time.monotonic()
        for i in range(SOAK_JOBS):
            data, samples = inputs[i % len(inputs)]
            variant = VARIANTS[i % len(VARIANTS)]
            t0 = time.monotonic()
            resp = c.post("/runsync", json={"input": {"audio_base64": b64(data), **variant}})
            body = resp.json()
            assert body["status"] == "COMPLETED", body
            seconds.append(time.monotonic() - t0)
            final = body["output"][-1]
            for out in final["outputs"]:
                check_audio(fetch(out["url"]), out, samples=samples,
                            channels=variant.get("channels", 1))
            rss.append(proc.memory_info().rss / 2**20)
            threads.append(proc.num_threads())
            fds.append(proc.num_fds())
        total = time.monotonic() - started
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.log()
    first = statistics.mean(rss[5:5 + WINDOW])  # after the first jobs' warm-up
    last = statistics.mean(rss[-WINDOW:])
    print(f"\n{SOAK_JOBS} jobs in {total:.1f} s (median {statistics.median(seconds):.2f} s/job);"
          f" RSS {first:.0f} -> {last:.0f} MB (peak {max(rss):.0f}); threads {threads[5]} -> "
          f"{threads[-1]}; fds {fds[5]} -> {fds[-1]}")
    assert last - first < RSS_GROWTH_LIMIT_MB, rss
    assert max(threads[5:]) <= threads[5] + 2, threads
    assert max(fds[-WINDOW:]) <= fds[5] + 4, fds
    assert not list(work.iterdir()), "temp files left in WORK_DIR"
