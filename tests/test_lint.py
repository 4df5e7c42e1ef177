"""Lint is part of the test-suite: ruff on the code, hadolint on both Dockerfiles."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_hadolint_clean(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, dockerfile], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfiles_bake_and_never_download_at_run_time() -> None:
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (ROOT / name).read_text()
        assert "builder/install.sh" in text and "builder/bake_models.py" in text, name
        assert "HF_HUB_OFFLINE=1" in text and "MODELS_DIR=/models" in text, name
        # start.sh runs the serverless worker unless MODE_TO_RUN=http.
        assert 'CMD ["sh", "/app/start.sh"]' in text and "COPY start.sh" in text, name
        assert "HEALTHCHECK" in text and "handler.server" in text, name
    start = (ROOT / "start.sh").read_text()
    assert 'serverless | "") exec python -u handler/handler.py' in start
    assert "http) exec python -u -m handler.server" in start
    gpu = (ROOT / "Dockerfile").read_text()
    assert "REQUIRE_CUDA=1" in gpu and "install.sh gpu" in gpu
