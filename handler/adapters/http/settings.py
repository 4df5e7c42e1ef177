"""The HTTP service's settings, from the environment once at start (README's table).

The predecessors' names are honoured as aliases: ``PORT``/``HOST`` (bind address),
``DEMUCS_MODEL`` (default model) and ``SEPARATION_TIMEOUT`` (execution timeout, seconds).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from handler import config

log = logging.getLogger(__name__)

DEFAULT_WEBHOOK_BACKOFF = "5,30,120,600,1800,3600,10800,21600"  # ~10.7 h over 9 attempts


def _first(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _tokens() -> tuple[str, ...]:
    raw = ",".join(filter(None, (_first("API_TOKEN"), _first("API_TOKENS"))))
    return tuple(t.strip() for t in raw.split(",") if t.strip())


@dataclass
class ServerSettings:
    host: str = field(default_factory=lambda: _first("HOST") or "0.0.0.0")
    port: int = field(default_factory=lambda: int(_first("PORT") or 8000))
    data_dir: Path = field(default_factory=lambda: Path(_first("DATA_DIR") or "data"))
    public_base_url: str | None = field(
        default_factory=lambda: (_first("PUBLIC_BASE_URL") or "").rstrip("/") or None)
    tokens: tuple[str, ...] = field(default_factory=_tokens)
    require_auth: bool = field(default_factory=lambda: config.env_bool("REQUIRE_AUTH"))
    max_concurrency: int = field(default_factory=lambda: max(1, config.env_int(
        "MAX_CONCURRENCY", 1)))
    max_queue: int = field(default_factory=lambda: config.env_int("MAX_QUEUE", 100))
    max_upload_bytes: int = field(default_factory=lambda: int(
        config.env_float("MAX_UPLOAD_MB", 20) * 1024 * 1024))
    sync_max_wait_s: float = field(default_factory=lambda: config.env_float(
        "SYNC_MAX_WAIT_S", 300))
    execution_timeout_s: float = field(default_factory=lambda: float(
        _first("EXECUTION_TIMEOUT_S", "SEPARATION_TIMEOUT") or 600))
    job_ttl_s: float = field(default_factory=lambda: config.env_float("JOB_TTL_S", 86400))
    result_retention_s: float = field(default_factory=lambda: config.env_float(
        "RESULT_RETENTION_S", 86400))
    janitor_interval_s: float = field(default_factory=lambda: config.env_float(
        "JANITOR_INTERVAL_S", 60))
    max_attempts: int = field(default_factory=lambda: max(1, config.env_int("MAX_ATTEMPTS", 2)))
    shutdown_grace_s: float = field(default_factory=lambda: config.env_float(
        "SHUTDOWN_GRACE_S", 600))
    webhook_secret: str | None = field(default_factory=lambda: _first("WEBHOOK_SECRET"))
    webhook_backoff_s: tuple[float, ...] = field(default_factory=lambda: tuple(
        float(x) for x in config.env_str("WEBHOOK_BACKOFF_S", DEFAULT_WEBHOOK_BACKOFF).split(",")
        if x.strip()))
    webhook_timeout_s: float = field(default_factory=lambda: config.env_float(
        "WEBHOOK_TIMEOUT_S", 15))
    legacy_routes: bool = field(default_factory=lambda: config.env_bool("LEGACY_ROUTES", True))

    def __post_init__(self) -> None:
        alias = _first("DEMUCS_MODEL")
        if alias and not os.environ.get("DEFAULT_MODEL", "").strip():
            # The CPU predecessor's name for the default model: the job flow reads DEFAULT_MODEL.
            os.environ["DEFAULT_MODEL"] = alias

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"
