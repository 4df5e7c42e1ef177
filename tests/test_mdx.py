"""MDX-Net on ONNX Runtime (handler/core/models/mdx_net.py) against audio-separator 0.47.1.

Random-weight ONNX models with UVR's I/O convention (devtools/mdx.py); the oracle is
audio-separator's own ``Separator`` on the same WAV file. Our output is streamed through the
engine in small decoded blocks and must be ≥ 60 dB SNR from the oracle's (measured: ~145 dB,
float rounding). See devtools.mdx.run_oracle for why its gain stages are no-ops here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from devtools.mdx import mix_signal, model_data, run_oracle, write_model
from devtools.metrics import snr_db
from handler.core.chunking import DONE, ChunkSettings
from handler.core.engine import EngineOptions, separate_array
from handler.core.models import get_model, unload_all
from handler.core.models.mdx_net import (
    HASH_BYTES,
    KNOWN_HASHES,
    MdxChunking,
    MdxParams,
    file_hash,
    ort_cuda_problem,
)
from handler.errors import InvalidInput, ModelUnavailable

pytest.importorskip("audio_separator")

RATE = 44100
# Small shapes (many chunks in 31 s) and a vocal model at Kim_Vocal_2's STFT settings.
INST = dict(n_fft=2048, dim_f=256, dim_t=64, compensate=1.03, primary="Instrumental")
VOC = dict(n_fft=7680, dim_f=3072, dim_t=256, compensate=1.009, primary="Vocals")


@pytest.fixture(scope="module")
def mdx_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mdx_models")
    write_model(d, "tiny_inst", seed=1, **INST)
    write_model(d, "kimlike_voc", seed=2, **VOC)
    return d


@pytest.fixture
def models_env(mdx_dir, monkeypatch):
    monkeypatch.setenv("MODELS_DIR", str(mdx_dir))
    unload_all()
    yield mdx_dir
    unload_all()


def _oracle(mdx_dir: Path, name: str, params: dict, seconds: float, seed: int, work: Path,
            denoise: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray], Path]:
    x = mix_signal(seconds, seed)
    wav = work / f"{name}_{seconds}.wav"
    sf.write(wav, x.T, RATE, subtype="FLOAT")
    ref = run_oracle(mdx_dir / f"{name}.onnx", model_data(**params), wav, work / name,
                     denoise=denoise)
    for stem, audio in ref.items():  # its output limiter (peak > 1.0) must not have acted
        assert audio.shape == x.shape and 0 < np.abs(audio).max() < 1.0, stem
    return x, ref, wav


@pytest.fixture(scope="module")
def inst_case(mdx_dir, tmp_path_factory):
    return _oracle(mdx_dir, "tiny_inst", INST, 31.3, 0, tmp_path_factory.mktemp("oracle"))


def _ours(name: str, x: np.ndarray, block: int = 44100) -> dict[str, np.ndarray]:
    model = get_model(name)
    assert model.sources == ["vocals", "instrumental"]
    out = separate_array(model, x, EngineOptions(shifts=1, overlap=model.default_overlap),
                         block=block)
    return dict(zip(model.sources, out, strict=True))


def test_streamed_equals_audio_separator_many_chunks(models_env, inst_case):
    x, ref, _ = inst_case
    chunking = MdxChunking(MdxParams(2048, 256, 64, 1.03, "instrumental"),
                           ChunkSettings(0, 0.25))
    assert chunking.chunks_total(chunking.lane_total(x.shape[1])) >= 25
    ours = _ours("tiny_inst", x, block=30_011)  # blocks that never align with chunks
    for stem in ("vocals", "instrumental"):
        assert snr_db(ref[stem], ours[stem]) >= 60, stem
    # The secondary stem is mix - compensate * primary, inside the overlap-add.
    np.testing.assert_allclose(ours["vocals"], x - 1.03 * ours["instrumental"], atol=2e-6)


def test_vocal_model_at_kim_shapes_with_denoise(models_env, monkeypatch, tmp_path):
    monkeypatch.setenv("MDX_DENOISE", "1")
    x, ref, _ = _oracle(models_env, "kimlike_voc", VOC, 30.5, 4, tmp_path, denoise=True)
    ours = _ours("kimlike_voc", x, block=100_000)
    for stem in ("vocals", "instrumental"):
        assert snr_db(ref[stem], ours[stem]) >= 60, stem
    unload_all()
    monkeypatch.delenv("MDX_DENOISE")
    plain = _ours("kimlike_voc", x, block=100_000)
    assert snr_db(ref["vocals"], plain["vocals"]) < 40  # denoise really changed the output


def test_short_input_inside_one_chunk(models_env, tmp_path):
    x, ref, _ = _oracle(models_env, "tiny_inst", INST, 0.9, 7, tmp_path)
    ours = _ours("tiny_inst", x, block=10_000)
    for stem in ("vocals", "instrumental"):
        assert snr_db(ref[stem], ours[stem]) >= 60, stem


@pytest.mark.parametrize("n", [1, 2, 1000, 57_344, 57_345, 64_512, 300_000, 1_380_330])
def test_hanning_zero_ends_stay_in_the_cropped_margin(n):
    """np.hanning is 0 at both ends: lane position 0 gets no weight (0/0), as in
    audio-separator. Every input sample must have weight > 0; only margin positions may not."""
    rule = MdxChunking(MdxParams(2048, 256, 64, 1.0, "instrumental"), ChunkSettings(0, 0.25))
    total = rule.lane_total(n)
    weight = np.zeros(total)
    k = 0
    while (w := rule.window(k, total, total)) is not DONE:
        assert w.read_len == rule.chunk and w.trim == 0
        weight[w.out_start:w.out_start + w.out_len] += w.weight.numpy()
        k += 1
    assert k == rule.chunks_total(total)
    assert (weight[rule.prefix:rule.prefix + n] > 0).all()
    zero = np.flatnonzero(weight == 0)
    assert zero[0] == 0 and all(z == 0 or z >= rule.prefix + n for z in zero)


def test_pipeline_cli_job_matches_oracle(models_env, inst_case, tmp_path):
    from handler.adapters.cli import main

    x, ref, wav = inst_case
    out = tmp_path / "out"
    rc = main(["--input", str(wav), "--output", str(out), "--model", "tiny_inst",
               "--all-stems", "--format", "wav", "--channels", "2", "-q"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["instrumental.wav", "vocals.wav"]
    for stem in ("vocals", "instrumental"):
        audio, rate = sf.read(out / f"{stem}.wav", dtype="float32", always_2d=True)
        assert rate == RATE and audio.shape == (x.shape[1], 2)
        assert snr_db(ref[stem], audio.T) >= 60, stem  # 16-bit WAV: ~85 dB here


def test_unknown_hash_without_sidecar_says_what_to_add(models_env, tmp_path):
    path = models_env / "mystery.onnx"
    path.write_bytes((models_env / "tiny_inst.onnx").read_bytes())
    with pytest.raises(ModelUnavailable) as err:
        get_model("mystery")
    msg = str(err.value)
    assert msg.startswith("MODEL_UNAVAILABLE: mystery.onnx has UVR hash " + file_hash(path))
    assert "mystery.json" in msg and "mdx_n_fft_scale_set" in msg
    path.unlink()


def test_known_hash_needs_no_sidecar(models_env, monkeypatch):
    path = models_env / "byhash.onnx"
    path.write_bytes((models_env / "tiny_inst.onnx").read_bytes())
    params = MdxParams(2048, 256, 64, 1.03, "instrumental")
    monkeypatch.setitem(KNOWN_HASHES, file_hash(path), ("UVR-test", params))
    model = get_model("byhash")
    assert model.members[0].forward.params == params
    path.unlink()


def test_file_hash_is_uvr_tail_md5(tmp_path):
    big = tmp_path / "big.onnx"
    data = np.random.default_rng(0).bytes(HASH_BYTES + 12345)
    big.write_bytes(data)
    assert file_hash(big) == hashlib.md5(data[-HASH_BYTES:]).hexdigest()
    small = tmp_path / "small.onnx"
    small.write_bytes(data[:1000])
    assert file_hash(small) == hashlib.md5(data[:1000]).hexdigest()


def test_sidecar_that_contradicts_the_network_is_refused(models_env):
    bad = models_env / "wrongdims"
    bad.with_suffix(".onnx").write_bytes((models_env / "tiny_inst.onnx").read_bytes())
    data = model_data(**{**INST, "dim_f": 512})
    bad.with_suffix(".json").write_text(json.dumps(data))
    with pytest.raises(ModelUnavailable, match="dim_f 256; its parameters say 512"):
        get_model("wrongdims")
    bad.with_suffix(".json").write_text(json.dumps({"compensate": 1.0}))
    with pytest.raises(ModelUnavailable, match="lacks mdx_dim_f_set"):
        get_model("wrongdims")


@pytest.mark.parametrize("name", ["../tiny_inst", "/etc/passwd", "a/b", ".hidden"])
def test_names_cannot_leave_models_dir(models_env, name):
    with pytest.raises(InvalidInput, match="unknown model"):
        get_model(name)


def test_named_model_missing_says_how_to_bake(models_env):
    with pytest.raises(ModelUnavailable, match="bake_models.py --models UVR-MDX-NET-Inst_HQ_4"):
        get_model("UVR-MDX-NET-Inst_HQ_4")


def test_cuda_provider_check_reports_this_cpu_build():
    problem = ort_cuda_problem()
    assert problem is not None and "CUDA" in problem
