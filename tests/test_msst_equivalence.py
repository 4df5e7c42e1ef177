"""MSST models streamed through our engine vs audio-separator 0.47.1's own ``demix``.

Small random-weight networks with the public band layouts (viperx BS-RoFormer 1297's 62 bands,
Kim's 60 mel bands, MDX23C InstVoc HQ's STFT and subbands), saved as the public files are, on
inputs that span many chunks; the oracle loads the same files with its own loader.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("audio_separator")
pytest.importorskip("rotary_embedding_torch")

from devtools import msst as ms  # noqa: E402
from handler.core.engine import EngineOptions, separate_array  # noqa: E402
from handler.core.models import msst  # noqa: E402

SR = 44100

CASES = {
    # name: (config, arch, inference.dim_t, num_overlap, engine batch, seconds)
    "bs_1297_layout": (ms.BS_1297, "bs", 101, 2, 1, 26.3),
    "mel_kim_layout": (ms.KIM_MEL, "mel", 121, 2, 3, 25.7),
    "mdx23c_instvoc_layout": (ms.MDX23C_INSTVOC, "mdx23c", 64, 3, 2, 25.2),
}


@pytest.fixture(autouse=True)
def _quiet_single_thread():
    # Tiny networks: thread hand-offs cost more than they save on a shared, loaded box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(threads)


def _ours(tmp_path, monkeypatch, name: str, mix: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    monkeypatch.setenv("MODELS_DIR", str(tmp_path))
    model = msst.load_msst(name, torch.device("cpu"))
    out = separate_array(model, mix, EngineOptions(shifts=0, batch_size=batch), block=30011)
    return dict(zip(model.sources, out, strict=True))


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_output_equals_audio_separator(tmp_path, monkeypatch, case):
    base, arch, dim_t, overlaps, batch, seconds = CASES[case]
    cfg = ms.small(base, arch, dim_t=dim_t, num_overlap=overlaps)
    ms.write_pair(tmp_path, case, cfg, seed=3)
    mix = ms.stereo_noise(seconds, seed=5)
    chunk = msst.spec_of(cfg, msst.architecture(cfg)).chunk
    assert mix.shape[1] > 10 * chunk  # many chunks, and a tail that is not a whole step

    ours = _ours(tmp_path, monkeypatch, case, mix, batch)
    ref = ms.oracle_demix(tmp_path / f"{case}.ckpt", tmp_path / f"{case}.yaml", mix)

    assert sorted(ours) == sorted(ref)
    for stem, expected in ref.items():
        assert ours[stem].shape == mix.shape
        assert np.abs(expected).max() > 1e-3  # the networks do produce something
        snr = ms.snr_db(expected, ours[stem])
        print(f"{case} {stem}: {snr:.1f} dB")
        assert snr >= 60, (stem, snr)


@pytest.mark.parametrize("case", ["bs_1297_layout", "mdx23c_instvoc_layout"])
def test_input_shorter_than_a_chunk(tmp_path, monkeypatch, case):
    """One short chunk (RoFormer: its iSTFT drops the last partial hop, left at zero as the
    reference does; MDX23C: padded to a chunk)."""
    base, arch, dim_t, overlaps, batch, _ = CASES[case]
    cfg = ms.small(base, arch, dim_t=dim_t, num_overlap=overlaps)
    ms.write_pair(tmp_path, case, cfg, seed=4)
    chunk = msst.spec_of(cfg, msst.architecture(cfg)).chunk
    mix = ms.stereo_noise(0.6 * chunk / SR, seed=6)
    ours = _ours(tmp_path, monkeypatch, case, mix, batch)
    ref = ms.oracle_demix(tmp_path / f"{case}.ckpt", tmp_path / f"{case}.yaml", mix)
    for stem, expected in ref.items():
        assert ms.snr_db(expected, ours[stem]) >= 60


def test_model_outputs_equal_the_oracle_class(tmp_path):
    """Network level, one chunk: our classes vs audio-separator's on the same checkpoint."""
    for name, (base, arch, dim_t, overlaps, _, _) in CASES.items():
        cfg = ms.small(base, arch, dim_t=dim_t, num_overlap=overlaps)
        ms.write_pair(tmp_path, name, cfg, seed=7)
        ours, spec = msst.load_network(tmp_path / f"{name}.ckpt", tmp_path / f"{name}.yaml")
        ref, _ = ms.oracle_network(tmp_path / f"{name}.ckpt", tmp_path / f"{name}.yaml")
        x = torch.from_numpy(ms.stereo_noise(spec.chunk / SR + 0.01, seed=8))[None, :, :spec.chunk]
        with torch.inference_mode():
            a, b = ours(x), ref(x)
        assert ms.snr_db(b.numpy(), a.reshape(b.shape).numpy()) >= 100, name


def test_default_job_runs_the_reference(tmp_path, monkeypatch):
    """A whole pipeline run with no chunking options given (no shifts, no overlap) decodes,
    separates and encodes exactly audio-separator's demix (to 16-bit PCM rounding)."""
    import soundfile as sf

    from handler.core.pipeline import SeparationRequest, separate_file

    base, arch, dim_t, overlaps, _, _ = CASES["bs_1297_layout"]
    cfg = ms.small(base, arch, dim_t=dim_t, num_overlap=overlaps)
    ms.write_pair(tmp_path / "models", "viperx_small", cfg, seed=9)
    monkeypatch.setenv("MODELS_DIR", str(tmp_path / "models"))
    mix = ms.stereo_noise(9.7, seed=10)
    sf.write(tmp_path / "in.wav", mix.T, SR, subtype="FLOAT")
    req = SeparationRequest(model="viperx_small", stems=["vocals", "instrumental"],
                            output_format="wav", channels=2)
    separate_file(tmp_path / "in.wav", tmp_path / "out", req)
    ref = ms.oracle_demix(tmp_path / "models/viperx_small.ckpt",
                          tmp_path / "models/viperx_small.yaml", mix)
    for stem, ref_stem in (("vocals", "vocals"), ("instrumental", "other")):
        ours, rate = sf.read(tmp_path / "out" / f"{stem}.wav", dtype="float32")
        assert rate == SR and ours.shape == mix.T.shape
        assert ms.snr_db(ref[ref_stem], ours.T) >= 60, stem
