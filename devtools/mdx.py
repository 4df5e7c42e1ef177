"""Small random-weight MDX-Net ONNX models, and audio-separator 0.47.1 run as the oracle.

No real weights can be downloaded here. The models keep UVR's I/O convention (input named
``input``, float [batch, 4, dim_f, dim_t] → the same shape), so the real ONNX Runtime session
and the real STFT/chunking code run exactly as they would on a released model.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import types
from pathlib import Path

import numpy as np
import soundfile as sf
import torch


class TinyMdx(torch.nn.Module):
    """Convolutions plus a dense layer across frequency (as MDX-Net's TDF blocks); the
    nonlinearity has an even part, so the denoise path (f(x) - f(-x)) is really tested."""

    def __init__(self, dim_f: int, hidden: int = 8):
        super().__init__()
        self.inp = torch.nn.Conv2d(4, hidden, 3, padding=1)
        # MDX-Net's TDF: a bottlenecked dense layer across the frequency axis
        self.tdf = torch.nn.Sequential(torch.nn.Linear(dim_f, 32, bias=False),
                                       torch.nn.Linear(32, dim_f, bias=False))
        self.out = torch.nn.Conv2d(hidden, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.inp(x * 0.01))
        h = a + a * a  # an even part too: f(-x) != -f(x)
        h = self.tdf(h.transpose(-1, -2)).transpose(-1, -2)
        return x * 0.5 + 20 * self.out(h)


def export_onnx(path: Path, dim_f: int, dim_t: int, seed: int, net: torch.nn.Module | None = None,
                dynamic_batch: bool = True) -> Path:
    """torch.onnx.export's TorchScript exporter (dynamo=False): works offline with torch 2.13
    and needs no onnxscript."""
    torch.manual_seed(seed)
    net = (net or TinyMdx(dim_f)).eval()
    x = torch.zeros(1, 4, dim_f, dim_t)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), input_names=["input"], output_names=["output"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


def model_data(n_fft: int, dim_f: int, dim_t: int, compensate: float, primary: str) -> dict:
    """UVR's model_data keys (what a sidecar JSON and audio-separator's hash table hold)."""
    return {"compensate": compensate, "mdx_dim_f_set": dim_f,
            "mdx_dim_t_set": int(np.log2(dim_t)), "mdx_n_fft_scale_set": n_fft,
            "primary_stem": primary}


def write_model(models_dir: Path, name: str, n_fft: int, dim_f: int, dim_t: int,
                compensate: float, primary: str, seed: int, sidecar: bool = True) -> Path:
    path = export_onnx(models_dir / f"{name}.onnx", dim_f, dim_t, seed)
    if sidecar:
        data = model_data(n_fft, dim_f, dim_t, compensate, primary)
        (models_dir / f"{name}.json").write_text(json.dumps(data))
    return path


def mix_signal(seconds: float, seed: int, rate: int = 44100) -> np.ndarray:
    """(2, n) float32: tones, a sweep and noise bursts, peak exactly 1.0 (see run_oracle)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    left = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * (100 + 400 * t) * t)
    right = 0.3 * np.sin(2 * np.pi * 330 * t + 1.0)
    noise = rng.standard_normal((2, t.size)) * 0.1 * (np.sin(2 * np.pi * 0.7 * t) > 0)
    x = np.stack([left, right]) + noise
    x /= np.abs(x).max()
    return x.astype(np.float32)


def _stub_onnx2torch() -> None:
    """audio-separator's mdx_separator imports onnx2torch at module level but uses it only
    when segment_size != dim_t (never here: ONNX Runtime runs the model). onnx2torch imports
    torchvision, which has no build for this torch; an empty stand-in satisfies the import
    and fails loudly if that path were ever taken."""
    if "onnx2torch" not in sys.modules:
        stub = types.ModuleType("onnx2torch")

        def convert(*_a, **_k):
            raise AssertionError("the oracle took its onnx2torch path")

        stub.convert = convert  # type: ignore[attr-defined]
        sys.modules["onnx2torch"] = stub


def run_oracle(onnx: Path, data: dict, wav: Path, work: Path, denoise: bool = False,
               overlap: float = 0.25) -> dict[str, np.ndarray]:
    """audio-separator 0.47.1's own ``Separator`` on a WAV file: {"vocals"|"instrumental":
    (2, n)}.

    Its model lookups are served from files in its model folder, as it reads them before any
    download (download_checks.json listing our file, mdx_model_data.json with our hash).
    Unity gain: the input is float WAV with a peak of exactly 1.0 and normalization_threshold
    is 1.0, so its input normalisation is a no-op, the primary stem's ``* peak`` is ``* 1.0``
    and its output limiter only acts if a stem exceeds 1.0 (the caller checks it did not).
    use_soundfile writes float WAV (the input's subtype), so no quantisation either.
    """
    _stub_onnx2torch()
    os.environ.setdefault("PYTEST_CURRENT_TEST", "oracle")  # its ffmpeg check (pydub unused)
    from audio_separator.separator import Separator

    model_dir = work / "as_models"
    model_dir.mkdir(parents=True, exist_ok=True)
    filename = "oracle_mdx_model.onnx"
    target = model_dir / filename
    target.write_bytes(onnx.read_bytes())
    from handler.core.models.mdx_net import file_hash

    lists = ["demucs_download_list", "vr_download_list", "mdx_download_vip_list",
             "mdx23c_download_list", "mdx23c_download_vip_list", "roformer_download_list"]
    checks = {k: {} for k in lists}
    checks["mdx_download_list"] = {"Oracle test model": filename}
    (model_dir / "download_checks.json").write_text(json.dumps(checks))
    (model_dir / "vr_model_data.json").write_text("{}")
    (model_dir / "mdx_model_data.json").write_text(json.dumps({file_hash(target): data}))
    out_dir = work / "as_out"
    sep = Separator(
        log_level=logging.WARNING, model_file_dir=str(model_dir), output_dir=str(out_dir),
        output_format="WAV", normalization_threshold=1.0, use_soundfile=True,
        mdx_params={"hop_length": 1024, "segment_size": 2 ** data["mdx_dim_t_set"],
                    "overlap": overlap, "batch_size": 1, "enable_denoise": denoise},
    )
    sep.load_model(model_filename=filename)
    files = sep.separate(str(wav))
    stems = {}
    for f in files:
        audio, _ = sf.read(out_dir / Path(f).name, dtype="float32", always_2d=True)
        stem = "vocals" if "(Vocals)" in f else "instrumental"
        stems[stem] = audio.T
    return stems


def oracle_demix(onnx: Path, data: dict, mix: np.ndarray, overlap: float = 0.25) -> np.ndarray:
    """audio-separator's ``MDXSeparator.demix`` on a whole (2, n) array: the primary stem.
    The object is built with ``__new__`` (its ``__init__`` resolves files and devices) and
    given the attributes ``demix``/``run_model`` read, with an ONNX Runtime session as in its
    ``load_model``."""
    _stub_onnx2torch()
    import onnxruntime as ort
    from audio_separator.separator.architectures.mdx_separator import MDXSeparator

    sep = MDXSeparator.__new__(MDXSeparator)
    sep.logger = logging.getLogger("mdx-oracle")
    sep.torch_device = torch.device("cpu")
    sep.hop_length, sep.overlap, sep.batch_size, sep.enable_denoise = 1024, overlap, 1, False
    sep.n_fft = data["mdx_n_fft_scale_set"]
    sep.dim_f = data["mdx_dim_f_set"]
    sep.dim_t = sep.segment_size = 2 ** data["mdx_dim_t_set"]
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    sep.model_run = lambda spek: session.run(None, {"input": spek.cpu().numpy()})[0]
    return sep.demix(mix)
