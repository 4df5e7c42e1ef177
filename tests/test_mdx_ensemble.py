"""Presets (handler/core/models/presets.json): ``mdx23`` on small random members, streamed
through the engine in small blocks, against the recipe computed on whole arrays by the
members' reference code (audio-separator's MDX demix, demucs's apply_model)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from devtools.mdx import mix_signal, model_data, oracle_demix, write_model
from devtools.metrics import snr_db
from handler.core.engine import EngineOptions, separate_array
from handler.core.models import get_model, unload_all
from handler.core.models.ensemble import presets
from handler.core.models.mdx_net import MdxNetwork
from handler.errors import ModelUnavailable

pytest.importorskip("audio_separator")

KIM_VOC = dict(n_fft=2048, dim_f=256, dim_t=64, compensate=1.009, primary="Vocals")
KIM_INST = dict(n_fft=3072, dim_f=384, dim_t=32, compensate=1.02, primary="Instrumental")


@pytest.fixture
def ensemble_dir(demucs_repo, tmp_path, monkeypatch):
    d = tmp_path / "models"
    shutil.copytree(demucs_repo, d)
    write_model(d, "Kim_Vocal_2", seed=11, **KIM_VOC)
    write_model(d, "Kim_Inst", seed=12, **KIM_INST)
    monkeypatch.setenv("MODELS_DIR", str(d))
    unload_all()
    yield d
    unload_all()


def test_mdx23_streamed_equals_whole_array_recipe(ensemble_dir):
    from demucs.apply import apply_model
    from demucs.pretrained import get_model as demucs_model

    model = get_model("mdx23")
    # Kim_Vocal_2, Kim_Inst, and htdemucs_ft's two networks that weigh vocals (test bag).
    assert len(model.members) == 4 and model.sources == ["vocals", "instrumental"]
    assert [m.weights[0] for m in model.members] == [12.0, 8.0, 1.5, 1.5]
    assert isinstance(model.members[0].forward, MdxNetwork)  # Kim_Vocal_2 as is
    assert model.members[0].forward.compensate == 1.0  # the preset's override
    x = mix_signal(8.3, 5)
    ours = separate_array(model, x, EngineOptions(shifts=0, overlap=0.25), block=17_001)

    v_kim = oracle_demix(ensemble_dir / "Kim_Vocal_2.onnx", model_data(**KIM_VOC), x)
    inst = -oracle_demix(ensemble_dir / "Kim_Inst.onnx", model_data(**KIM_INST), -x)
    bag = demucs_model("htdemucs_ft", repo=ensemble_dir)
    vi = bag.sources.index("vocals")
    with torch.no_grad():
        def dm(a: np.ndarray) -> np.ndarray:
            out = apply_model(bag, torch.from_numpy(a)[None], shifts=0, overlap=0.25)
            return out[0, vi].numpy()
        v_dm = 0.5 * (dm(x) - dm(-x))
    vocals = (12 * v_kim + 8 * (x - inst) + 3 * v_dm) / 23
    assert snr_db(vocals, ours[0]) >= 60
    assert snr_db(x - vocals, ours[1]) >= 60
    # every member matters: dropping the demucs part is far off
    assert snr_db((12 * v_kim + 8 * (x - inst)) / 20, ours[0]) < 40


def test_mdx23_without_its_onnx_members_says_which(demucs_repo, monkeypatch):
    monkeypatch.setenv("MODELS_DIR", str(demucs_repo))
    unload_all()
    with pytest.raises(ModelUnavailable, match="preset mdx23: .*Kim_Vocal_2"):
        get_model("mdx23")
    unload_all()


def test_presets_are_data():
    mdx23 = presets()["mdx23"]
    assert [m["model"] for m in mdx23["members"]] == ["Kim_Vocal_2", "Kim_Inst", "htdemucs_ft"]
    assert [m["weight"] for m in mdx23["members"]] == [12, 8, 3]
