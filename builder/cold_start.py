"""Cold start: wall time from a new Python process to the default model ready for a job.

It covers interpreter start, the worker's imports and ``prepare_worker()`` (the runpod SDK's
import and the default model's load: what the worker does before taking its first job), in
the current environment and MODELS_DIR.

    python builder/cold_start.py --models spleeter_2stems,htdemucs --repeat 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = (
    "import time, sys; t0 = time.perf_counter(); sys.path.insert(0, {root!r});"
    "from handler import handler as h; t1 = time.perf_counter(); h.prepare_worker();"
    "t2 = time.perf_counter(); print(f'{{t1 - t0:.3f}} {{t2 - t1:.3f}}')"
)


def measure(model: str) -> tuple[float, float, float]:
    env = {**os.environ, "DEFAULT_MODEL": model, "LOG_LEVEL": "WARNING"}
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(root=str(ROOT))],
        env=env, check=True, stdout=subprocess.PIPE, text=True,
    ).stdout.split()
    total = time.perf_counter() - started
    return total, float(out[0]), float(out[1])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="spleeter_2stems,htdemucs")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    print(f"{'model':<18}{'total s':>9}{'imports s':>11}{'SDK+model s':>12}")
    for model in args.models.split(","):
        best = min((measure(model) for _ in range(args.repeat)), key=lambda r: r[0])
        print(f"{model:<18}{best[0]:>9.2f}{best[1]:>11.2f}{best[2]:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
