"""RunPod serverless entry point: ``python -u handler/handler.py``.

    python handler/handler.py --test_input '{"input": {...}}'   # one job, exit 1 on failure
    python handler/handler.py --test_input_file job.json        # the same, any size
    python handler/handler.py --input-file song.mp3 [--test_input_file opts.json]
    python handler/handler.py                                   # test_input.json, same
    python handler/handler.py --rp_serve_api                    # the SDK's local HTTP API

The default model is loaded before the first job is taken (cold start), and every job reuses
it. The SDK's own ``--test_input`` path never iterates a generator handler and always exits
0, so local runs go through ``run_local`` here instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the ``handler`` package importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

# The SDK logs every streamed item (our presigned URLs) at its default DEBUG level.
os.environ.setdefault("RUNPOD_DEBUG_LEVEL", "INFO")

import logging  # noqa: E402
from collections.abc import Iterator  # noqa: E402

from handler import config  # noqa: E402
from handler.adapters.interrupt import Interrupted, interruptible  # noqa: E402
from handler.redact import install_log_redaction, install_stream_redaction  # noqa: E402
from handler.service.runner import run_job  # noqa: E402

log = logging.getLogger("worker")


def handler(job: dict) -> Iterator[dict]:
    """RunPod generator handler: progress items, then one final result or error item."""
    yield from run_job(job)


def warm_up() -> None:
    """Load the default model now, so the first job does not pay for it."""
    from handler.core.models import get_model, pick_device

    device = pick_device()
    if config.env_bool("REQUIRE_CUDA") and device.type != "cuda":
        raise SystemExit(
            "REQUIRE_CUDA is set but CUDA is not usable (no GPU visible, or a CPU build of torch):"
            " refusing to run the GPU image on the CPU"
        )
    if device.type == "cuda":
        import torch

        try:  # visible is not usable: a driver/arch mismatch only shows when a kernel runs
            torch.ones(1, device=device).add_(1).item()
        except Exception as exc:  # noqa: BLE001 - any CUDA failure means: do not serve
            raise SystemExit(f"CUDA is visible but not usable ({exc}); check the driver and "
                             "the image's CUDA version") from None
    if config.env_bool("REQUIRE_CUDA"):
        from handler.core.models.mdx_net import ort_cuda_problem

        # MDX-Net models run on ONNX Runtime, which falls back to the CPU quietly.
        problem = ort_cuda_problem()
        if problem is not None:
            raise SystemExit(f"REQUIRE_CUDA is set but {problem}: refusing to run the GPU "
                             "image's ONNX models on the CPU")
    started = time.perf_counter()
    model = get_model(config.default_model())
    log.info("model %s ready on %s in %.2f s", model.name, device, time.perf_counter() - started)


def _skip_sdk_cpu_probe() -> None:
    """The runpod SDK runs py-cpuinfo's full probe at import (rp_debugger: ~1.2 s of a 2 s
    import) only to label its optional debugger output. Answer it from /proc instead."""
    if "cpuinfo" in sys.modules:
        return
    import platform
    import types

    brand = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                brand = line.split(":", 1)[1].strip()
                break
    stub = types.ModuleType("cpuinfo")
    stub.get_cpu_info = lambda: {"brand_raw": brand}  # type: ignore[attr-defined]
    sys.modules["cpuinfo"] = stub


def prepare_worker():
    """Everything before the first job: SDK import (without its CPU probe) and the model."""
    install_stream_redaction()  # the SDK prints; only a stream wrapper reaches those lines
    _skip_sdk_cpu_probe()
    import runpod

    warm_up()
    return runpod


def _arg(argv: list[str], flag: str) -> str | None:
    if flag not in argv:
        return None
    i = argv.index(flag)
    if i + 1 >= len(argv):
        raise SystemExit(f"{flag} needs a value")
    return argv[i + 1]


def _local_job(argv: list[str]) -> dict | None:
    """The job for a local run, or None: ``--test_input JSON``, ``--test_input_file PATH``
    (no command-line length limit), ./test_input.json; ``--input-file AUDIO`` makes a local
    file the job's audio (copied into the job's folder: no base64 size limit), and outputs
    go to ``--output-dir`` (default ./out) when no bucket is configured."""
    from handler.service.destinations import LocalResults
    from handler.service.flow import LocalInput

    text, path, audio = (_arg(argv, f) for f in ("--test_input", "--test_input_file",
                                                  "--input-file"))
    if text is not None:
        job = json.loads(text)
    elif path is not None:
        job = json.loads(Path(path).read_text())
    elif audio is not None:
        job = {"input": {}}
    elif Path("test_input.json").is_file():
        job = json.loads(Path("test_input.json").read_text())
    else:
        return None
    if not isinstance(job, dict):
        raise SystemExit("the job must be a JSON object: {\"input\": {...}}")
    if audio is not None:
        if not Path(audio).is_file():
            raise SystemExit(f"--input-file: no such file: {audio}")
        job["local_input"] = LocalInput(Path(audio).resolve())
    out = Path(_arg(argv, "--output-dir") or "out")
    job["local_results"] = LocalResults(out, out.resolve().as_uri(), file_urls=True)
    return job


def run_local(job: dict) -> int:
    """Run one job to completion, printing progress (stderr) and the result (stdout).

    SIGINT/SIGTERM stop the job, remove its folder (input, partial outputs) and return
    128 + the signal number with a one-line message.
    """
    job = dict(job)
    job.setdefault("id", f"local-{int(time.time())}-{os.getpid()}")
    final: dict = {}
    try:
        # closing(): an interrupt between two items still runs the job's cleanup.
        with interruptible(), contextlib.closing(handler(job)) as items:
            for item in items:
                if item.get("status") == "progress":
                    pct = 100 * item["progress"]
                    print(f"[{item['stage']:>8}] {pct:5.1f}%", file=sys.stderr, flush=True)
                else:
                    final = item
    except Interrupted as e:
        print(f"handler: interrupted by {e.name}; the job was stopped and its temporary "
              "files removed", file=sys.stderr, flush=True)
        return e.exit_code
    print(json.dumps(final, indent=2, default=str))
    return 1 if "error" in final else 0


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=config.env_str("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    install_log_redaction()
    deployed = bool(os.environ.get("RUNPOD_WEBHOOK_GET_JOB"))
    serve_api = "--rp_serve_api" in argv or bool(os.environ.get("RUNPOD_REALTIME_PORT"))
    if not deployed and not serve_api:
        job = _local_job(argv)
        if job is None:
            print("no job: pass --test_input '<json>', --test_input_file job.json, "
                  "--input-file song.mp3 or create test_input.json", file=sys.stderr)
            return 2
        return run_local(job)

    runpod = prepare_worker()
    runpod.serverless.start({"handler": handler, "return_aggregate_stream": True})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
