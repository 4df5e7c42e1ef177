"""Webhook deliveries from the SQLite outbox: POST the job object on completion, retried on
the ``WEBHOOK_BACKOFF_S`` schedule (persisted, so retries survive restarts); ``410 Gone``
stops; signed with the Standard Webhooks scheme when ``WEBHOOK_SECRET`` is set. Targets pass
the same address guard as input URLs (``handler.transfer.netguard``)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import random
import threading
import time

import requests

from handler import config
from handler.adapters.http.settings import ServerSettings
from handler.adapters.http.store import Delivery, JobStore
from handler.errors import InvalidInput, WorkerError
from handler.redact import redact_url
from handler.transfer import netguard

log = logging.getLogger(__name__)


def secret_key(secret: str) -> bytes:
    """A Standard Webhooks secret (``whsec_`` + base64) as the HMAC key."""
    text = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("WEBHOOK_SECRET must be a Standard Webhooks secret: 'whsec_' followed "
                         "by base64 (e.g. whsec_$(openssl rand -base64 32))") from None
    if not key:
        raise ValueError("WEBHOOK_SECRET is empty")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: str) -> str:
    """``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` (Standard Webhooks)."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def check_target(url: str) -> None:
    """Refuse a webhook URL that could never be delivered to (before the job is queued)."""
    netguard.check_url(url, allow_private=config.allow_private_urls(), resolve_host=False)


class Sender:
    def __init__(self, store: JobStore, settings: ServerSettings):
        self.store = store
        self.settings = settings
        self.key = secret_key(settings.webhook_secret) if settings.webhook_secret else None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        store.on_delivery = self._wake.set

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=self.settings.webhook_timeout_s + 5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for delivery in self.store.due_deliveries(time.time()):
                if self._stop.is_set():
                    return
                self._deliver(delivery)
            nxt = self.store.next_delivery_at()
            wait = 30.0 if nxt is None else min(30.0, max(0.0, nxt - time.time()))
            self._wake.wait(timeout=wait)
            self._wake.clear()

    def _deliver(self, d: Delivery) -> None:
        shown = redact_url(d.url)
        headers = {"Content-Type": "application/json", "webhook-id": d.webhook_id}
        timestamp = int(time.time())
        headers["webhook-timestamp"] = str(timestamp)
        if self.key is not None:
            headers["webhook-signature"] = sign(self.key, d.webhook_id, timestamp, d.body)
        code: int | None = None
        retry_after: float | None = None
        try:
            allow = config.allow_private_urls()
            netguard.check_url(d.url, allow_private=allow)
            with netguard.guarded_session(allow_private=allow) as session:
                resp = session.post(d.url, data=d.body.encode(), headers=headers,
                                    timeout=self.settings.webhook_timeout_s,
                                    allow_redirects=False)
            code = resp.status_code
            error = None if 200 <= code < 300 else f"HTTP {code}"
            if code in (429, 503):
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except InvalidInput as exc:  # refused by the address guard: retrying cannot help
            log.warning("webhook %s for job %s refused: %s", shown, d.job_id, exc.message)
            self.store.delivery_result(d.id, state="failed", code=None, error=exc.message)
            return
        except WorkerError as exc:  # e.g. DNS failure: may pass later
            error = exc.message
        except requests.RequestException as exc:
            error = type(exc).__name__
        if error is None:
            self.store.delivery_result(d.id, state="delivered", code=code, error=None)
            log.info("webhook for job %s delivered (attempt %d)", d.job_id, d.attempt + 1)
            return
        if code == 410:
            self.store.delivery_result(d.id, state="gone", code=code, error=error)
            log.info("webhook %s answered 410 Gone: no more attempts", shown)
            return
        schedule = self.settings.webhook_backoff_s
        if d.attempt >= len(schedule):
            self.store.delivery_result(d.id, state="failed", code=code, error=error)
            log.warning("webhook %s for job %s failed after %d attempts (%s)", shown, d.job_id,
                        d.attempt + 1, error)
            return
        delay = schedule[d.attempt] * random.uniform(0.8, 1.2)  # noqa: S311 - jitter only
        if retry_after is not None:
            delay = max(delay, retry_after)
        self.store.delivery_result(d.id, state="pending", code=code, error=error,
                                   next_at=time.time() + delay)
        log.info("webhook %s for job %s: %s, retry in %.1f s", shown, d.job_id, error, delay)


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
