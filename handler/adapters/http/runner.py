"""Runs queued jobs through the job flow, ``MAX_CONCURRENCY`` at a time, one thread each.

The only module of the HTTP service that imports the job flow: re-point ``run_job`` here.
Cancel, execution timeout and shutdown all set the job's cancel event, which the flow checks
between chunks; the reason decides the final state.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from handler.adapters.http.settings import ServerSettings
from handler.adapters.http.store import (
    CANCELLED,
    COMPLETED,
    FAILED,
    RUNNING,
    TIMED_OUT,
    Job,
    JobStore,
)
from handler.service.destinations import LocalResults
from handler.service.runner import remove_work_dirs, run_job

log = logging.getLogger(__name__)


@dataclass
class _Running:
    cancel: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None  # cancel | timeout | shutdown

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.cancel.set()


def result_signature(key: bytes, job_id: str) -> str:
    """The token that lets a job's result URLs be fetched without the API token (like a
    presigned URL): only this server, holding ``key``, can make it."""
    return hmac.new(key, f"result/{job_id}".encode(), hashlib.sha256).hexdigest()[:32]


class Runner:
    def __init__(self, store: JobStore, settings: ServerSettings, signing_key: bytes):
        self.store = store
        self.settings = settings
        self.signing_key = signing_key
        self.accepting = True
        self._wake = threading.Condition()
        self._running: dict[str, _Running] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = False

    # --- control (any thread) ------------------------------------------------------------

    def start(self) -> None:
        for i in range(self.settings.max_concurrency):
            t = threading.Thread(target=self._loop, name=f"runner-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    @property
    def active(self) -> int:
        return len(self._running)

    def cancel(self, job_id: str) -> bool:
        """Stop a running job within one chunk; False if it is not running here."""
        running = self._running.get(job_id)
        if running is None:
            return False
        running.stop("cancel")
        return True

    def drain(self, grace_s: float) -> bool:
        """Stop taking jobs; wait up to ``grace_s`` for the running ones. Jobs still running
        then are stopped and re-queued for the next start. True if all finished in time."""
        self.accepting = False
        self._stopping = True
        self.wake()
        for t in self._threads:
            t.join(timeout=max(0.0, grace_s))
            if t.is_alive():
                break
        finished = not any(t.is_alive() for t in self._threads)
        if not finished:
            for running in list(self._running.values()):
                running.stop("shutdown")
            for t in self._threads:
                t.join(timeout=30)
        return finished

    # --- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping:
            job = self.store.claim_next() if self.accepting else None
            if job is None:
                with self._wake:
                    self._wake.wait(timeout=1.0)
                continue
            try:
                self._run(job)
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("job %s: runner failure", job.id)
                self.store.finish(job.id, FAILED, "INTERNAL: the server failed running the job",
                                  only_from=(RUNNING,))

    @staticmethod
    def sweep(job_ids: list[str]) -> int:
        """At start: the work folders of jobs a killed process was running."""
        return sum(remove_work_dirs(job_id) for job_id in job_ids)

    def _job_dict(self, job: Job) -> dict:
        out = {"id": job.id, **job.request}
        results = self.settings.results_dir / job.id
        base = self.settings.public_base_url or job.base_url
        out["local_results"] = LocalResults(
            dir=Path(results), url_prefix=f"{base}/result/{job.id}",
            url_suffix="?sig=" + result_signature(self.signing_key, job.id))
        return out

    def _run(self, job: Job) -> None:
        running = _Running()
        self._running[job.id] = running
        current = self.store.get(job.id)
        if current is None or current.status != RUNNING:  # cancelled as it was claimed
            running.stop("cancel")
        timer = threading.Timer(job.execution_timeout_s, running.stop, args=("timeout",))
        timer.daemon = True
        timer.start()
        final: dict | None = None
        try:
            for item in run_job(self._job_dict(job), cancel=running.cancel):
                if item.get("status") == "progress":
                    self.store.add_item(job.id, item)
                else:
                    final = item
        finally:
            timer.cancel()
            self._running.pop(job.id, None)
        if final is not None and "error" not in final:
            self.store.add_item(job.id, final)
            self.store.finish(job.id, COMPLETED, only_from=(RUNNING,))
            return
        error = str((final or {}).get("error") or "INTERNAL: the job ended without a result")
        if running.reason == "timeout":
            self.store.finish(job.id, TIMED_OUT, f"TIMED_OUT: the job ran longer than its "
                              f"execution timeout ({job.execution_timeout_s:g} s)",
                              only_from=(RUNNING,))
        elif running.reason == "cancel":
            self.store.finish(job.id, CANCELLED, only_from=(RUNNING,))
        elif running.reason == "shutdown":
            self.store.requeue(job.id, from_status=(RUNNING,), refund=True)
        else:
            self.store.finish(job.id, FAILED, error, only_from=(RUNNING,))
