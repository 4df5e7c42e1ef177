"""mdx_q / mdx_extra_q: quantized demucs checkpoints load through demucs's own code (diffq's
compiled bitpack restores the weights) and separate through our worker.

diffq is built from source (it needs a C compiler) by builder/build_diffq.sh; the images
install that wheel, builder/install.sh's dev block builds and installs it for the tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from devtools.quantized import write_quantized_bag

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def quantized_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from handler.core.models import unload_all

    nets = write_quantized_bag(tmp_path, "mdx_q", seed=3)
    monkeypatch.setenv("MODELS_DIR", str(tmp_path))
    unload_all()
    yield tmp_path, nets
    unload_all()


def test_quantized_bag_loads_through_demucs_and_separates(quantized_repo) -> None:
    import diffq.bitpack  # noqa: F401 - the compiled extension, not a pure-Python fallback
    from demucs.apply import apply_model
    from demucs.demucs import Demucs
    from demucs.hdemucs import HDemucs
    from demucs.pretrained import get_model as demucs_get_model

    from handler.core.engine import EngineOptions, separate_array
    from handler.core.models import get_model

    repo, nets = quantized_repo
    assert all(torch.load(p, weights_only=False)["state"]["__quantized"]
               for p in repo.glob("*.th"))
    model = get_model("mdx_q")
    assert [type(m.module) for m in model.members] == [HDemucs, Demucs]
    assert model.sources == ["drums", "bass", "other", "vocals"]
    # The weights are diffq's 8-bit reconstruction of the originals: close, not equal.
    for member, net in zip(model.members, nets, strict=True):
        got, want = member.module.state_dict(), net.state_dict()
        diffs = [float((got[k] - want[k]).abs().max()) for k in want
                 if want[k].dtype.is_floating_point]
        assert 0 < max(diffs) < 5e-3, max(diffs)

    mix = (0.1 * np.random.default_rng(7).standard_normal((2, 2 * 44100))).astype(np.float32)
    out = separate_array(model, mix, EngineOptions(shifts=0))
    bag = demucs_get_model("mdx_q", repo=repo)
    ref = apply_model(bag, torch.from_numpy(mix)[None], shifts=0, split=True,
                      overlap=0.25)[0].numpy()
    assert out.shape == ref.shape == (4, 2, 2 * 44100)
    snr = 10 * np.log10(np.sum(ref**2) / max(np.sum((out - ref) ** 2), 1e-30))
    assert snr > 100, snr


def test_without_diffq_the_model_is_unavailable_and_the_process_lives(tmp_path: Path) -> None:
    write_quantized_bag(tmp_path, "mdx_q")
    script = """
import sys
sys.modules["diffq"] = None  # import diffq now raises ImportError, as when it is not installed
from handler.core.models import get_model
from handler.errors import ModelUnavailable
try:
    get_model("mdx_q")
except ModelUnavailable as exc:
    print("unavailable:", exc)
print("still running")
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"MODELS_DIR": str(tmp_path),
                                                       "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "unavailable: MODEL_UNAVAILABLE: model 'mdx_q' is quantized and needs diffq" \
        in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("still running")


def stages(dockerfile: str) -> list[str]:
    text = (ROOT / dockerfile).read_text()
    return ["FROM" + part for part in text.split("\nFROM")[1:]]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_images_compile_diffq_in_a_builder_stage_only(dockerfile: str) -> None:
    builder, final = stages(dockerfile)
    assert " AS diffq" in builder.splitlines()[0]
    assert "gcc" in builder and "bash /build/build_diffq.sh /wheels" in builder
    assert "COPY --from=diffq /wheels /tmp/wheels" in final
    assert "DIFFQ_WHEEL_DIR=/tmp/wheels bash builder/install.sh" in final
    for compiler in ("gcc", "build-essential", "g++", "clang", "build_diffq.sh"):
        assert compiler not in final, compiler
    # The builder stage compiles for the final stage's Python: same distribution and release.
    base = {"Dockerfile": "ubuntu:24.04", "Dockerfile.cpu": "python:3.11-slim-bookworm"}
    assert builder.splitlines()[0].split()[1] == base[dockerfile]
    assert base[dockerfile].split(":")[1].split("-")[0] in final.splitlines()[0]


def test_the_ci_replay_installs_diffq_as_the_cpu_image_does() -> None:
    replay = (ROOT / "builder" / "replay_cpu_build.sh").read_text()
    assert 'bash "$ROOT/builder/build_diffq.sh" "$WORK/wheels"' in replay
    assert 'DIFFQ_WHEEL_DIR="$WORK/wheels" bash "$WORK/app/builder/install.sh" cpu' in replay
    assert "mdx_q" in replay.split("--stand-in")[0].rsplit("MODELS=", 1)[1].splitlines()[0]
