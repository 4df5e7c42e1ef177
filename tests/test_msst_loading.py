"""MSST loading: safe files only, architecture from the YAML, full-size structure on the meta
device, stems, chunk schedules (the parts that need no heavy inference)."""

from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch

from devtools import msst as ms
from handler.core.models import get_model, msst, msst_chunking, unload_all
from handler.core.models.msst_chunking import PaddedSumRule, RoformerRule, hamming
from handler.errors import InvalidInput, ModelUnavailable


@pytest.fixture(autouse=True)
def _models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELS_DIR", str(tmp_path))
    unload_all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    unload_all()


def _tiny(base: dict, arch: str) -> dict:
    return ms.small(base, arch, dim_t=12, num_overlap=2)


# -- full size, no memory -----------------------------------------------------------------------
@pytest.mark.parametrize("cfg,params", [(ms.BS_1297, 159.758e6), (ms.KIM_MEL, 228.203e6),
                                        (ms.MDX23C_INSTVOC, 111.990e6)])
def test_full_size_structure_on_meta_device(cfg, params):
    arch = msst.architecture(cfg)
    spec = msst.spec_of(cfg, arch)
    with torch.device("meta"):
        net = msst.build_network(cfg, arch, 1 if spec.target else len(spec.sources))
    count = sum(p.numel() for p in net.parameters())
    assert abs(count - params) < 0.001e6, count
    if importlib.util.find_spec("audio_separator") is not None:  # keys and shapes too
        with torch.device("meta"):
            ref = ms.oracle_meta_network(cfg)
        ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_public_band_layouts_parse_from_tuple_tagged_yaml(tmp_path):
    ms.write_config(tmp_path / "bs.yaml", ms.BS_1297)
    text = (tmp_path / "bs.yaml").read_text()
    assert "!!python/tuple" in text
    cfg = msst.read_config(tmp_path / "bs.yaml")
    assert cfg["model"]["freqs_per_bands"] == ms.VIPERX_BANDS and len(ms.VIPERX_BANDS) == 62
    assert sum(cfg["model"]["freqs_per_bands"]) == 2048 // 2 + 1
    spec = msst.spec_of(cfg, msst.architecture(cfg))
    assert (spec.chunk, spec.num_overlap) == (441 * 800, 4)  # stft hop x (inference.dim_t - 1)
    kim = msst.spec_of(ms.KIM_MEL, msst.architecture(ms.KIM_MEL))
    assert kim.chunk == 441 * 1100 != ms.KIM_MEL["inference"]["chunk_size"]


def test_mel_band_membership_equals_librosa():
    librosa = pytest.importorskip("librosa")
    from handler.core.models.msst_arch.roformer import mel_band_membership

    for sr, n_fft, bands in [(44100, 2048, 60), (44100, 2048, 64), (48000, 4096, 128),
                             (44100, 2048, 32)]:
        ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=bands)
        ref[0, 0] = 1
        ref[-1, -1] = 1
        assert np.array_equal(mel_band_membership(sr, n_fft, bands), ref > 0)


# -- architecture from the YAML -----------------------------------------------------------------
def test_architecture_rules():
    bs, mel, mdx = ms.BS_1297, ms.KIM_MEL, ms.MDX23C_INSTVOC
    assert msst.architecture(bs) == "bs_roformer"
    assert msst.architecture(mel) == "mel_band_roformer"
    assert msst.architecture(mdx) == "mdx23c"
    both = {**bs, "model": {**bs["model"], "num_bands": 60}}
    with pytest.raises(ModelUnavailable, match="both"):
        msst.architecture(both)
    assert msst.architecture({**both, "model_type": "mel_band_roformer"}) == "mel_band_roformer"
    assert msst.architecture({**mdx, "model": {**mdx["model"], "type": "bs_roformer"}}) \
        == "bs_roformer"
    with pytest.raises(ModelUnavailable, match="not one of"):
        msst.architecture({**bs, "model_type": "htdemucs"})
    with pytest.raises(ModelUnavailable, match="no supported architecture"):
        msst.architecture({"model": {"dim": 3}})


def test_file_names_mean_nothing(tmp_path):
    ms.write_pair(tmp_path, "model_bs_roformer_ep_317", _tiny(ms.KIM_MEL, "mel"))
    model = get_model("model_bs_roformer_ep_317")
    assert type(model.members[0].module).__name__ == "MelBandRoformer"


# -- resolving by name, stems ---------------------------------------------------------------
def test_pair_is_a_model_by_name_with_stems(tmp_path):
    ms.write_pair(tmp_path, "kim", _tiny(ms.KIM_MEL, "mel"))
    ms.write_pair(tmp_path, "instvoc", _tiny(ms.MDX23C_INSTVOC, "mdx23c"))
    kim = get_model("kim")
    assert kim.sources == ["vocals", "other"] and "instrumental" in kim.stems
    assert get_model("kim") is kim  # cached
    inst = get_model("instvoc")
    assert inst.sources == ["vocals", "instrumental"]  # case-insensitive names
    assert kim.members[0].module.training is False and inst.samplerate == 44100
    many = _tiny(ms.MDX23C_INSTVOC, "mdx23c")
    many["training"] = {"instruments": ["Drums", "Bass", "Other", "Vocals"],
                        "target_instrument": None}
    ms.write_pair(tmp_path, "four", many)
    assert get_model("four").sources == ["drums", "bass", "other", "vocals"]
    target = _tiny(ms.MDX23C_INSTVOC, "mdx23c")
    target["training"]["target_instrument"] = "Instrumental"
    ms.write_pair(tmp_path, "inst_only", target)
    assert get_model("inst_only").sources == ["instrumental", "vocals"]


def test_unknown_and_unsafe_names(tmp_path):
    ms.write_config(tmp_path / "lonely.yaml", _tiny(ms.KIM_MEL, "mel"))  # no .ckpt
    for name in ("lonely", "../kim", "kim/..", ".hidden", "a" * 200):
        with pytest.raises(InvalidInput, match="unknown model"):
            get_model(name)
    with pytest.raises(InvalidInput):
        msst.load_msst("../etc", torch.device("cpu"))


# -- untrusted files ----------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_a_payload_is_refused(tmp_path):
    ms.write_pair(tmp_path, "evil", _tiny(ms.KIM_MEL, "mel"))
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": _Payload(str(marker))},
               tmp_path / "evil.ckpt")
    with pytest.raises(ModelUnavailable, match="not a plain tensor state dict"):
        get_model("evil")
    assert not marker.exists()
    # Sanity check of the payload itself: unpickled without weights_only it does run.
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.exists()


def test_unsafe_yaml_tag_is_refused(tmp_path):
    ms.write_pair(tmp_path, "evil", _tiny(ms.KIM_MEL, "mel"))
    marker = tmp_path / "pwned"
    text = (tmp_path / "evil.yaml").read_text()
    (tmp_path / "evil.yaml").write_text(
        f"hook: !!python/object/apply:os.system ['touch {marker}']\n" + text)
    with pytest.raises(ModelUnavailable, match="not a valid MSST YAML"):
        get_model("evil")
    assert not marker.exists()


@pytest.mark.parametrize("wrap", [None, "state_dict", "model_state_dict", "model", "state"])
def test_wrapped_and_half_precision_checkpoints_load(tmp_path, wrap):
    cfg = _tiny(ms.BS_1297, "bs")
    state = ms.write_pair(tmp_path, "bs", cfg, wrap=wrap, half=wrap == "state")
    net, _ = msst.load_network(tmp_path / "bs.ckpt", tmp_path / "bs.yaml")
    loaded = net.state_dict()
    for k, v in state.items():
        tol = 1e-3 * float(v.abs().max()) if wrap == "state" else 0
        assert loaded[k].dtype == torch.float32 and torch.allclose(loaded[k], v, atol=tol), k


def test_bad_files_are_typed_errors(tmp_path):
    cfg = _tiny(ms.BS_1297, "bs")
    ms.write_pair(tmp_path, "bs", cfg)
    data = (tmp_path / "bs.ckpt").read_bytes()
    (tmp_path / "bs.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelUnavailable, match="not a plain tensor state dict"):
        get_model("bs")
    unload_all()
    ms.write_pair(tmp_path, "bs", cfg)
    other = _tiny(ms.BS_1297, "bs")
    other["model"]["dim"] = 24
    ms.write_config(tmp_path / "bs.yaml", other)
    with pytest.raises(ModelUnavailable, match="does not match its config"):
        get_model("bs")
    (tmp_path / "bs.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ModelUnavailable, match="not a valid MSST YAML"):
        get_model("bs")
    torch.save([1, 2, 3], tmp_path / "bs.ckpt")
    ms.write_config(tmp_path / "bs.yaml", cfg)
    with pytest.raises(ModelUnavailable, match="no state dict"):
        get_model("bs")


# -- chunk schedules ----------------------------------------------------------------------------
def test_roformer_schedule_equals_audio_separator():
    pytest.importorskip("audio_separator")
    ms._oracle_package()
    from audio_separator.separator.architectures.mdxc_separator import MDXCSeparator

    for chunk, step in [(1000, 250), (1000, 1000), (882, 441), (1000, 333)]:
        rule = RoformerRule(chunk, step)
        for n in [1, 500, 999, 1000, 1001, 1250, 1251, 4321, 10000]:
            expected = MDXCSeparator._roformer_chunk_starts(n, chunk, step)
            got = []
            while (w := rule.window(len(got), n, n)) is not None and w is not msst_done():
                got.append(w.read_start)
            assert got == expected and rule.chunks_total(n) == len(expected), (chunk, step, n)
            # Streaming: a chunk handed out before the length is known is one of those.
            for k in range(len(expected)):
                w = rule.window(k, None, n)
                assert w is None or w.read_start == expected[k]


def msst_done():
    from handler.core.chunking import DONE

    return DONE


def test_hamming_equals_scipy():
    signal = pytest.importorskip("scipy.signal")
    for n in (1, 2, 7, 44100, 352800):
        expected = torch.tensor(signal.windows.hamming(n), dtype=torch.float32)
        assert torch.equal(hamming(n), expected)


def test_mdx23c_padding_equals_audio_separator():
    for chunk, overlaps in [(261120, 8), (64512, 3), (1000, 4)]:
        hop = chunk // overlaps
        rule = PaddedSumRule(chunk, hop, overlaps)
        for n in (1, hop, chunk, chunk + 1, 5 * chunk + 17):
            pad = hop - (n - chunk) % hop  # audio-separator's own formula
            padded = n + pad + 2 * (chunk - hop)
            assert rule.prefix == chunk - hop and rule.lane_total(n) == padded
            assert rule.chunks_total(padded) == (padded - chunk) // hop + 1


@pytest.mark.parametrize("base,arch", [(ms.BS_1297, "bs"), (ms.KIM_MEL, "mel"),
                                       (ms.MDX23C_INSTVOC, "mdx23c")])
def test_half_precision_path_keeps_spectra_in_float32(tmp_path, base, arch):
    """Autocast (bf16 here; fp16 on a GPU): STFT/iSTFT, norms and rotary angles stay float32,
    the output is float32 and close to the float32 run (the GPU speed is measured by
    bench/msst_gpu.py)."""
    ms.write_pair(tmp_path, arch, _tiny(base, arch), seed=2)
    net, spec = msst.load_network(tmp_path / f"{arch}.ckpt", tmp_path / f"{arch}.yaml")
    x = torch.from_numpy(ms.stereo_noise(spec.chunk / 44100 + 0.01, seed=3))[None, :, :spec.chunk]
    with torch.inference_mode():
        full = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = net(x)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert ms.snr_db(full.numpy(), half.numpy()) > 15


def test_job_options_reach_the_rule():
    """num_overlap (a count) and segment (rounded to what the network takes) from a job."""
    from handler.core.chunking import ChunkSettings

    for cfg in (ms.BS_1297, ms.MDX23C_INSTVOC):
        spec = msst.spec_of(cfg, msst.architecture(cfg))
        make = msst_chunking.chunker_for(spec)
        default = make(None, ChunkSettings(spec.chunk, 0.25))
        assert default.chunk == spec.chunk and default.prefix >= 0
        assert default.chunk // (default.step if hasattr(default, "step") else default.hop) \
            == spec.num_overlap
        rule = make(None, ChunkSettings(5 * 44100, 0.25, num_overlap=3, shift_prefix=7))
        hop = rule.step if hasattr(rule, "step") else rule.hop
        assert rule.chunk % spec.hop == 0 and abs(rule.chunk - 5 * 44100) <= 16 * spec.hop
        assert hop == rule.chunk // 3
        if spec.time_multiple > 1:
            assert (rule.chunk // spec.hop + 1) % spec.time_multiple == 0
            assert rule.prefix == 7 + rule.chunk - hop
        else:
            assert rule.prefix == 7
