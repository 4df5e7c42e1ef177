"""The process: uvicorn serving the app, with a drain on SIGTERM.

First SIGTERM/SIGINT: /readyz turns 503 and new jobs are refused (503), the running job gets
``SHUTDOWN_GRACE_S`` to finish (status and results stay readable meanwhile), then the server
stops and the process exits 0. Queued jobs and pending webhooks stay in SQLite for the next
start. A second signal exits at once.
"""

from __future__ import annotations

import logging
import threading
from types import FrameType

import uvicorn

from handler import config
from handler.adapters.http.app import create_app
from handler.adapters.http.settings import ServerSettings
from handler.redact import install_log_redaction, register_secret

log = logging.getLogger(__name__)


class _DrainingServer(uvicorn.Server):
    def __init__(self, cfg: uvicorn.Config, drain: callable):  # type: ignore[valid-type]
        super().__init__(cfg)
        self._drain = drain
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not re-raised after shutdown (uvicorn's default): a drained exit is a clean exit 0.
        if self._draining:
            self.force_exit = self.should_exit = True
            return
        self._draining = True
        threading.Thread(target=self._drain_then_exit, name="drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        try:
            self._drain()
        finally:
            self.should_exit = True


def serve(host: str | None = None, port: int | None = None) -> int:
    logging.basicConfig(level=config.env_str("LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    settings = ServerSettings()
    if host:
        settings.host = host
    if port:
        settings.port = port
    for secret in (*settings.tokens, settings.webhook_secret):
        register_secret(secret)  # never in a log line
    if settings.require_auth and not settings.tokens:
        log.error("REQUIRE_AUTH is set but API_TOKEN is empty: refusing to start")
        return 2
    app = create_app(settings)
    service = app.state.service
    cfg = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                         timeout_keep_alive=10, timeout_graceful_shutdown=10,
                         limit_concurrency=config.env_int("HTTP_MAX_CONNECTIONS", 200))
    server = _DrainingServer(cfg, service.drain)
    log.info("serving on http://%s:%d (data in %s)", settings.host, settings.port,
             settings.data_dir)
    server.run()
    return 0
