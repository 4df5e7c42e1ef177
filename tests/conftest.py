"""Shared pytest fixtures, by section. Helpers live in modules beside this file."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# --- import path ----------------------------------------------------------------------------
# Lets test modules `import handler` under plain `pytest` (tests/ itself is put on sys.path by
# pytest, so helpers import as `from servers import ...`). Redundant once pytest's
# `pythonpath = ["."]` is configured.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from devtools.servers import LocalHTTPServer, LocalS3Server  # noqa: E402

# --- network and storage ------------------------------------------------------------------


@pytest.fixture
def http_server() -> Iterator[LocalHTTPServer]:
    """A scriptable HTTP server on 127.0.0.1, fresh per test.

    ``url = http_server.route("/a.wav", Serve(data))``; see tests/servers.py for Status,
    Redirect, Stall, LyingLength, Reset, Html, AcceptPut. ``http_server.hits(path)`` counts
    requests, ``http_server.uploads[path]`` holds PUT bodies.
    """
    server = LocalHTTPServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3Server]:
    """moto's S3 on 127.0.0.1 for the whole session: ``.endpoint_url``, ``.client()``,
    ``.create_bucket()`` (unique name), ``.settings(bucket)`` (an S3Settings)."""
    server = LocalS3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fast_local_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Env for talking to the local test servers: loopback allowed, short retries/timeouts."""
    monkeypatch.setenv("ALLOW_PRIVATE_URLS", "1")
    monkeypatch.setenv("RETRY_BACKOFF_S", "0.01")
    monkeypatch.setenv("DOWNLOAD_TIMEOUT_S", "2")
    monkeypatch.setenv("UPLOAD_TIMEOUT_S", "5")


@pytest.fixture
def s3_env(
    monkeypatch: pytest.MonkeyPatch, s3_server: LocalS3Server, fast_local_network: None
) -> str:
    """BUCKET_* env (RunPod style) pointing at s3_server and a fresh bucket; returns the
    bucket name. Dummy AWS_* credentials too, so nothing can reach real AWS."""
    bucket = s3_server.create_bucket()
    for name, value in s3_server.bucket_env(bucket).items():
        monkeypatch.setenv(name, value)
    return bucket


# --- random demucs models (engine / decode / CLI tests) -------------------------------------


@pytest.fixture(scope="session")
def demucs_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local demucs repo with random ``htdemucs`` and 2-model bag ``htdemucs_ft``
    (tests/demucs_repo.py), built once per session."""
    from devtools.checkpoints import make_repo

    return make_repo(tmp_path_factory.mktemp("demucs_repo"))


@pytest.fixture
def demucs_models(demucs_repo: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """MODELS_DIR -> ``demucs_repo``, with the per-process model cache emptied before and
    after the test (so no other test sees these random weights)."""
    from handler.core.models import unload_all

    monkeypatch.setenv("MODELS_DIR", str(demucs_repo))
    unload_all()
    try:
        yield demucs_repo
    finally:
        unload_all()


@pytest.fixture(scope="module")
def demucs_models_module(demucs_repo: Path) -> Iterator[Path]:
    """As ``demucs_models`` for a whole module: the loaded models stay cached between its
    tests (loading costs about half a second each time)."""
    from handler.core.models import unload_all

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELS_DIR", str(demucs_repo))
        unload_all()
        try:
            yield demucs_repo
        finally:
            unload_all()
