"""Typed errors. Every failure a caller can cause maps to a stable CODE.

A job's output on failure is exactly one item: ``{"error": "CODE: message"}``.
"""

from __future__ import annotations

import errno


class WorkerError(Exception):
    """Base class: ``str(err)`` is ``"CODE: message"``."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidInput(WorkerError):
    code = "INVALID_INPUT"


class DownloadFailed(WorkerError):
    code = "DOWNLOAD_FAILED"


class UnsupportedAudio(WorkerError):
    code = "UNSUPPORTED_AUDIO"


class TooLong(WorkerError):
    code = "TOO_LONG"


class ModelUnavailable(WorkerError):
    code = "MODEL_UNAVAILABLE"


class UploadFailed(WorkerError):
    code = "UPLOAD_FAILED"


class Cancelled(WorkerError):
    code = "CANCELLED"


class InternalError(WorkerError):
    code = "INTERNAL"


def as_worker_error(exc: BaseException) -> WorkerError:
    """Map any exception to a WorkerError without leaking internals (paths, URLs, secrets)."""
    if isinstance(exc, WorkerError):
        return exc
    if isinstance(exc, MemoryError):
        return InternalError("out of memory")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InternalError("no space left on the worker's temporary disk")
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:  # e.g. RLIMIT_FSIZE
        return InternalError("a file on the worker's temporary disk exceeded the allowed size")
    return InternalError(f"unexpected {type(exc).__name__}")
