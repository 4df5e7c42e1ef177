"""Batch timing for the README: a folder of short clips through ``demucs-separate``.

    .venv/bin/python bench/batch.py                  # 20 x 3 s, --jobs 1 and 2, fan-out x4
    .venv/bin/python bench/batch.py --files 8 --seconds 2 --jobs 1 2 3

1. Local: ``demucs-separate -i DIR -o OUT --jobs N`` (one process, one model) for each N.
2. Fan-out: the self-hosted service (``python -m handler.server`` on 127.0.0.1, no bucket:
   inputs go inline, results come back from its local store), and ``demucs-separate --endpoint
   URL --concurrency C`` against it. The service runs its jobs one at a time per process, so
   this measures the client's overhead and pipelining, not a cluster.
Each run is a fresh process (model load included, as a user's run); wall times printed with
the CPU model. Default model: $DEFAULT_MODEL (spleeter_2stems).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.net import free_port  # noqa: E402
from devtools.songs import make_mixture, write_audio  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cli(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "handler.adapters.cli", *args, "-q"], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--concurrency", type=int, nargs="+", default=[4])
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        music = work / "music"
        music.mkdir()
        for i in range(args.files):
            write_audio(music / f"clip{i:02d}.wav", make_mixture(args.seconds, seed=i)["mixture"])
        print(f"CPU: {cpu_model()} ({os.cpu_count()} logical), torch threads "
              f"{os.environ.get('TORCH_THREADS', 'default')}, model "
              f"{os.environ.get('DEFAULT_MODEL', 'spleeter_2stems')}; "
              f"{args.files} x {args.seconds:g} s clips")
        for jobs in args.jobs:
            t = cli("-i", str(music), "-o", str(work / f"out-j{jobs}"), "--jobs", str(jobs))
            print(f"local  --jobs {jobs}: {t:6.1f} s  ({t / args.files:.2f} s/file)")
        port = free_port()
        env = {**os.environ, "DATA_DIR": str(work / "server")}
        for name in ("BUCKET_NAME", "BUCKET_ENDPOINT_URL"):
            env.pop(name, None)
        server = subprocess.Popen([sys.executable, "-m", "handler.server", "--host", "127.0.0.1",
                                   "--port", str(port)], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if requests.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the service did not start")
                time.sleep(0.5)
            for conc in args.concurrency:
                t = cli("-i", str(music), "-o", str(work / f"out-c{conc}"), "--endpoint", url,
                        "--concurrency", str(conc))
                print(f"fan-out --concurrency {conc} (local service): {t:6.1f} s  "
                      f"({t / args.files:.2f} s/file)")
        finally:
            server.terminate()
            server.wait(60)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
