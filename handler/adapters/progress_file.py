"""The predecessor's progress JSON file (``demucs-separate --progress-file``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from handler.core.progress import Throttle


class ProgressFile:
    """The predecessor's progress JSON, kept up to date atomically (write, then rename).

    ``state``: idle | demucs | completed | error; ``tasks``: models, cutting, inference,
    conversion, each pending | running | done | error.
    """

    TASKS = ("models", "cutting", "inference", "conversion")

    def __init__(self, path: Path, interval: float = 0.5):
        self.path = path
        self.started = time.time()
        self.state = "idle"
        self.tasks = dict.fromkeys(self.TASKS, "pending")
        self.details: dict = {
            "models_ready": False, "completed_segments": 0, "total_segments": 0, "percent": 0.0,
        }
        self.error: str | None = None
        self._throttle = Throttle(interval)
        self.write(force=True)

    def task(self, name: str, status: str) -> None:
        self.tasks[name] = status
        if name == "models" and status == "done":
            self.details["models_ready"] = True
        if status == "running":
            self.state = "demucs"
        self.write(force=True)

    def segments(self, done: int, total: int) -> None:
        self.details.update(
            completed_segments=done, total_segments=total,
            percent=round(100.0 * done / total, 1) if total else 0.0,
        )
        self.write()

    def completed(self, outputs: list[str]) -> None:
        self.state = "completed"
        self.tasks = dict.fromkeys(self.TASKS, "done")
        self.details["percent"] = 100.0
        self.details["outputs"] = outputs
        self.write(force=True)

    def failed(self, message: str) -> None:
        self.state = "error"
        self.error = message
        self.tasks = {k: ("error" if v == "running" else v) for k, v in self.tasks.items()}
        self.write(force=True)

    def write(self, force: bool = False) -> None:
        if not self._throttle.ready(force):
            return
        body = {
            "state": self.state,
            "tasks": self.tasks,
            "timestamp": time.time(),
            "elapsed_seconds": round(time.time() - self.started, 3),
            "details": self.details,
        }
        if self.error is not None:
            body["error"] = self.error
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(body, indent=2))
        os.replace(tmp, self.path)
