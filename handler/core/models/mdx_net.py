"""UVR MDX-Net models: bare ``.onnx`` spectrogram-to-spectrogram networks run by ONNX Runtime.

Contract: ``MODELS_DIR/<name>.onnx`` (and, optionally, ``MODELS_DIR/<name>.json`` with UVR's
model_data keys) is the model ``<name>``. An ``.onnx`` file does not carry its STFT settings:
they come from the sidecar if there is one, else from UVR's table keyed by the file's hash
(MD5 of its last 10,240,000 bytes, or of the whole file if smaller).

The arithmetic is audio-separator 0.47.1's MDX path (``separator/architectures/
mdx_separator.py``, ``uvr_lib_v5/stft.py``) with its defaults, at unity gain: its multiplying
the primary stem by the input's peak and its 0.9 output limiter are left out (see README).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from handler import config
from handler.core.chunking import DONE, ChunkSettings, Window, _Done
from handler.core.models.base import INSTRUMENTAL, VOCALS, LoadedModel, Member
from handler.errors import InvalidInput, ModelUnavailable

log = logging.getLogger(__name__)

HOP = 1024  # UVR's hop for every MDX-Net model
SAMPLERATE = 44100
HASH_BYTES = 10_000 * 1024  # UVR's (and audio-separator's get_model_hash) lookup window
DEFAULT_OVERLAP = 0.25  # audio-separator's mdx_params default
SIDECAR_KEYS = ("compensate", "mdx_dim_f_set", "mdx_dim_t_set", "mdx_n_fft_scale_set",
                "primary_stem")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


@dataclass(frozen=True)
class MdxParams:
    n_fft: int
    dim_f: int
    dim_t: int  # STFT frames per chunk (UVR stores log2 of it as mdx_dim_t_set)
    compensate: float
    primary: str  # VOCALS or INSTRUMENTAL

    @property
    def chunk(self) -> int:
        return HOP * (self.dim_t - 1)

    @property
    def trim(self) -> int:
        return self.n_fft // 2

    @classmethod
    def from_model_data(cls, data: dict, where: str) -> MdxParams:
        """UVR's model_data keys (as in its model_data.json and audio-separator's)."""
        missing = [k for k in SIDECAR_KEYS if k not in data]
        if missing:
            raise ModelUnavailable(f"{where} lacks {', '.join(missing)} (UVR model_data keys: "
                                   f"{', '.join(SIDECAR_KEYS)})")
        try:
            primary = str(data["primary_stem"]).strip().lower()
            params = cls(
                n_fft=int(data["mdx_n_fft_scale_set"]),
                dim_f=int(data["mdx_dim_f_set"]),
                dim_t=2 ** int(data["mdx_dim_t_set"]),
                compensate=float(data["compensate"]),
                primary=VOCALS if primary == "vocals" else INSTRUMENTAL,
            )
        except (TypeError, ValueError) as exc:
            raise ModelUnavailable(f"{where} has a malformed value ({exc})") from None
        if primary not in ("vocals", "instrumental"):
            raise ModelUnavailable(f"{where}: primary_stem must be Vocals or Instrumental, "
                                   f"not {data['primary_stem']!r}")
        if not (params.n_fft % 2 == 0 and 3 < params.dim_f <= params.n_fft // 2 + 1
                and params.dim_t >= 2 and 2 * params.trim < params.chunk):
            raise ModelUnavailable(f"{where} describes impossible STFT settings: {params}")
        return params


def _p(n_fft: int, dim_f: int, compensate: float, primary: str) -> MdxParams:
    return MdxParams(n_fft, dim_f, 256, compensate, primary)


# UVR's parameters, keyed by file hash. Source: TRvlvr/application_data
# mdx_model_data/model_data_new.json, which audio-separator 0.47.1 downloads at run time,
# as transcribed in shared/research/models-2026.md §2a; HQ_5 from the model-data.json that
# ships in the audio-separator 0.47.1 wheel (its only MDX entry). dim_t is 2**8 for all.
KNOWN_HASHES: dict[str, tuple[str, MdxParams]] = {
    "970b3f9492014d18fefeedfe4773cb42": ("Kim_Vocal_2", _p(7680, 3072, 1.009, VOCALS)),
    "73492b58195c3b52d34590d5474452f6": ("Kim_Vocal_1", _p(7680, 3072, 1.043, VOCALS)),
    "77d07b2667ddf05b9e3175941b4454a0": ("UVR-MDX-NET-Voc_FT", _p(7680, 3072, 1.021, VOCALS)),
    "b6bccda408a436db8500083ef3491e8b": ("Kim_Inst", _p(7680, 3072, 1.02, INSTRUMENTAL)),
    "55657dd70583b0fedfba5f67df11d711": ("UVR-MDX-NET-Inst_HQ_3",
                                         _p(6144, 3072, 1.022, INSTRUMENTAL)),
    "0f2a6bc5b49d87d64728ee40e23bceb1": ("UVR-MDX-NET-Inst_HQ_4",
                                         _p(5120, 2560, 1.019, INSTRUMENTAL)),
    "cb790d0c913647ced70fc6b38f5bea1a": ("UVR-MDX-NET-Inst_HQ_5",
                                         _p(5120, 2560, 1.010, INSTRUMENTAL)),
    # Karaoke: the "instrumental" keeps the backing vocals (is_karaoke in UVR's table).
    "1d64a6d2c30f709b8c9b4ce1366d96ee": ("UVR_MDXNET_KARA_2",
                                         _p(5120, 2048, 1.065, INSTRUMENTAL)),
    "2f5501189a2f6db6349916fabe8c90de": ("UVR_MDXNET_KARA", _p(6144, 2048, 1.035, VOCALS)),
}
# The named models (their release file names without ``.onnx``), each under its known hash.
NAMED = {name: h for h, (name, _) in KNOWN_HASHES.items()}
MDX_MODELS = (
    "UVR-MDX-NET-Inst_HQ_3", "UVR-MDX-NET-Inst_HQ_4", "UVR-MDX-NET-Inst_HQ_5", "Kim_Vocal_2",
    "Kim_Inst", "UVR-MDX-NET-Voc_FT", "UVR_MDXNET_KARA_2",
)


def file_hash(path: Path) -> str:
    """UVR's key: MD5 of the last 10,240,000 bytes (the whole file if it is smaller)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(max(0, size - HASH_BYTES))
        digest = hashlib.md5(usedforsecurity=False)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_name(name: str) -> bool:
    """A model name that can only mean a file directly inside MODELS_DIR."""
    return bool(_SAFE_NAME.fullmatch(name)) and ".." not in name


def onnx_path(name: str) -> Path | None:
    """MODELS_DIR/<name>.onnx if ``name`` is a plain file name and the file exists."""
    if not safe_name(name):
        return None
    path = config.models_dir() / f"{name}.onnx"
    return path if path.is_file() else None


def resolve_params(name: str, path: Path) -> MdxParams:
    """Sidecar JSON first (an explicit statement beats the table), else UVR's hash table."""
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"{sidecar.name} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ModelUnavailable(f"{sidecar.name} must hold a JSON object")
        return MdxParams.from_model_data(data, sidecar.name)
    digest = file_hash(path)
    known = KNOWN_HASHES.get(digest)
    if known is None:
        example = json.dumps({"compensate": 1.0, "mdx_dim_f_set": 3072, "mdx_dim_t_set": 8,
                              "mdx_n_fft_scale_set": 6144, "primary_stem": "Instrumental"})
        raise ModelUnavailable(
            f"{path.name} has UVR hash {digest}, which is not a known MDX-Net model; add "
            f"{name}.json beside it in MODELS_DIR with UVR's model_data keys, e.g. {example}")
    known_name, params = known
    if known_name != name:
        log.info("%s.onnx is %s by its hash", name, known_name)
    return params


# --- ONNX Runtime ------------------------------------------------------------------------------


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelUnavailable(f"MDX-Net models need onnxruntime ({exc})") from None
    return ort


def session_options():
    """bench/mdx.py measures these: intra-op threads sized to the CPU quota (ORT's default
    is one per host core, oversubscribed under a container quota; 1 thread is 1.7x slower
    than 2 on 2 cores), one inter-op thread (the graph is a chain), all graph optimisations.
    The CPU arena and memory-pattern planner are off by default: with them ORT keeps a
    chunk's peak activations for the life of the session (2.1 vs 1.3 GB at HQ shapes), and
    under tcmalloc, which the images preload, they gain nothing per chunk."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = config.ort_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_cpu_mem_arena = opts.enable_mem_pattern = config.ort_cpu_arena()
    opts.log_severity_level = 3
    return opts


def make_session(path: Path, device: torch.device):
    ort = _ort()
    if device.type == "cuda":
        if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the pip wheels torch brought
            ort.preload_dlls()
        cuda = {"device_id": device.index or 0}
        providers = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), session_options(), providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types for a bad file
        raise ModelUnavailable(f"{path.name} cannot be loaded by ONNX Runtime "
                               f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if device.type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise ModelUnavailable(
            f"ONNX Runtime {ort.__version__} could not activate CUDA for {path.name} (session "
            f"providers: {session.get_providers()}); the GPU image needs onnxruntime-gpu with "
            "CUDA 12 and cuDNN 9 libraries")
    return session


# An ONNX model with one Identity node (input "x", float [1]), serialized: enough to ask ONNX
# Runtime whether its CUDA provider activates, without the onnx package at run time.
_PROBE_MODEL = bytes.fromhex(
    "080812003a3b0a100a017812017922084964656e74697479120570726f62655a0f0a0178120a0a0808"
    "0112040a020801620f0a0179120a0a08080112040a02080142040a00100d"
)


def ort_cuda_problem() -> str | None:
    """None if ONNX Runtime runs a session on CUDA here, else why not (worker start check)."""
    try:
        ort = _ort()
    except ModelUnavailable as exc:
        return exc.message
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no CUDA provider (providers: "
                f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu")
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    try:
        session = ort.InferenceSession(_PROBE_MODEL, providers=["CUDAExecutionProvider",
                                                               "CPUExecutionProvider"])
        session.run(None, {"x": np.ones(1, np.float32)})
    except Exception as exc:  # noqa: BLE001 - any failure means: not usable
        return f"onnxruntime could not run on CUDA ({type(exc).__name__}: {str(exc)[:200]})"
    if "CUDAExecutionProvider" not in session.get_providers():
        return ("onnxruntime's CUDA provider did not activate (CUDA 12 / cuDNN 9 libraries "
                "not found by the loader)")
    return None


# --- the network ---------------------------------------------------------------------------------


class MdxNetwork:
    """One MDX-Net model: (batch, 2, chunk) waves -> (batch, 2 sources, 2, chunk).

    STFT as audio-separator's ``uvr_lib_v5/stft.py``: periodic Hann of n_fft, hop 1024,
    ``center=True`` (reflect padding), channels L re, L im, R re, R im, cropped to dim_f bins;
    the 3 lowest bins zeroed before the network; bins above dim_f zero-filled for the iSTFT.
    The secondary stem is ``mix - compensate * primary``: made per chunk here, which is exact
    under the normalised overlap-add (the sums are linear, the weights sum to one).
    """

    def __init__(self, session, params: MdxParams, device: torch.device, sources: list[str],
                 denoise: bool = False, compensate: float | None = None):
        self.session = session
        self.params = params
        self.device = device
        self.denoise = denoise
        self.compensate = params.compensate if compensate is None else compensate
        self.window = torch.hann_window(params.n_fft, periodic=True, device=device)
        self.input_name = session.get_inputs()[0].name
        self.primary_index = sources.index(params.primary)
        self.sources = sources
        self._check_shape()

    def _check_shape(self) -> None:
        shape = self.session.get_inputs()[0].shape
        p = self.params
        if len(shape) != 4:
            raise ModelUnavailable(f"expected an MDX-Net input [batch, 4, dim_f, dim_t], the "
                                   f"model takes {shape}")
        want = [4, p.dim_f, p.dim_t]
        for got, exp, what in zip(shape[1:], want, ("channels", "dim_f", "dim_t"), strict=True):
            if isinstance(got, int) and got != exp:
                raise ModelUnavailable(f"the model's input has {what} {got}; its parameters say "
                                       f"{exp} (fix the sidecar JSON)")
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None

    def stft(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        b, c, n = x.shape
        spec = torch.stft(x.reshape(b * c, n), p.n_fft, HOP, window=self.window, center=True,
                          return_complex=True)
        spec = torch.view_as_real(spec).permute(0, 3, 1, 2)  # (b*c, re/im, bins, frames)
        spec = spec.reshape(b, c * 2, -1, spec.shape[-1])[:, :, :p.dim_f].contiguous()
        spec[:, :, :3] = 0
        return spec

    def istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        p = self.params
        b = spec.shape[0]
        bins = p.n_fft // 2 + 1
        spec = torch.nn.functional.pad(spec, (0, 0, 0, bins - p.dim_f))
        spec = spec.reshape(b * 2, 2, bins, -1).permute(0, 2, 3, 1).contiguous()
        wave = torch.istft(torch.view_as_complex(spec), p.n_fft, HOP, window=self.window,
                           center=True, length=length)
        return wave.reshape(b, 2, length)

    def run(self, spec: torch.Tensor) -> torch.Tensor:
        if self.fixed_batch is not None and spec.shape[0] != self.fixed_batch:
            return torch.cat([self.run(s) for s in spec.split(self.fixed_batch)])
        if self.device.type == "cuda":
            return self._run_bound(spec)
        out = self.session.run(None, {self.input_name: spec.numpy()})[0]
        return torch.from_numpy(out)

    def _run_bound(self, spec: torch.Tensor) -> torch.Tensor:
        """CUDA: ONNX Runtime reads and writes torch's device memory (no host round trip)."""
        spec = spec.contiguous()
        out = torch.empty_like(spec)
        binding = self.session.io_binding()
        index = self.device.index or 0
        binding.bind_input(self.input_name, "cuda", index, np.float32, list(spec.shape),
                           spec.data_ptr())
        binding.bind_output(self.session.get_outputs()[0].name, "cuda", index, np.float32,
                            list(out.shape), out.data_ptr())
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out

    def primary(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.stft(x)
        # audio-separator's enable_denoise: ½ f(x) − ½ f(−x)
        pred = 0.5 * self.run(spec) - 0.5 * self.run(-spec) if self.denoise else self.run(spec)
        return self.istft(pred.to(x.device), x.shape[-1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        primary = self.primary(x)
        secondary = x - self.compensate * primary
        pair = [secondary, secondary]
        pair[self.primary_index] = primary
        return torch.stack(pair, dim=1)


# --- chunking ------------------------------------------------------------------------------------


class MdxChunking:
    """audio-separator's MDX ``demix``: ``trim`` zeros in front and ``gen + trim - n % gen``
    behind (lane coordinates: input sample i at lane position trim + i), chunks of
    ``hop * (dim_t - 1)`` every ``int((1 - overlap) * chunk)``, the last ones shorter (zero-
    padded for the network, weighted by ``np.hanning`` of their real length), each weighted by
    ``np.hanning(length)``, summed and divided by the summed weights, then cropped.

    ``np.hanning`` is zero at both ends, so lane position 0 gets no weight at all (0/0): that
    position is in the cropped margin, as it is in audio-separator. The job's ``segment`` does
    not apply (the ONNX input fixes the chunk) and neither does demucs's shift trick.
    """

    norm = None

    def __init__(self, params: MdxParams, settings: ChunkSettings):
        self.chunk = params.chunk
        self.trim = params.trim
        self.gen = self.chunk - 2 * self.trim
        self.prefix = self.trim
        self.windowed = settings.overlap != 0  # audio-separator: no window at overlap 0
        self.step = int((1 - settings.overlap) * self.chunk)
        if self.step <= 0:
            raise InvalidInput("overlap leaves no step between chunks")
        self.span = self.chunk + (settings.batch_size - 1) * self.step
        self._weights: dict[int, torch.Tensor] = {}

    def weight(self, length: int) -> torch.Tensor:
        w = self._weights.get(length)
        if w is None:
            w = (torch.from_numpy(np.hanning(length).astype(np.float32)) if self.windowed
                 else torch.ones(length))
            if len(self._weights) < 8:
                self._weights[length] = w
        return w

    def lane_total(self, n: int) -> int:
        return self.trim + n + self.gen + self.trim - n % self.gen

    def window(self, k: int, total: int | None, available: int) -> Window | _Done | None:
        start = k * self.step
        if total is not None:
            if start >= total:
                return DONE
            length = min(self.chunk, total - start)
        elif available < start + self.chunk:
            return None  # (the input may still end inside this chunk)
        else:
            length = self.chunk
        return Window(start, self.chunk, start, length, 0, self.weight(length))

    def safe_end(self, k: int, total: int | None, available: int) -> int:
        start = k * self.step
        return total if total is not None and start >= total else start

    def read_floor(self, k: int, total: int | None, available: int) -> int:
        return k * self.step

    def chunks_total(self, total: int) -> int:
        return -(-total // self.step)


def mdx_member(network: Callable[[torch.Tensor], torch.Tensor], params: MdxParams,
               weights: list[float]) -> Member:
    return Member(
        forward=network,
        segment_length=params.chunk,
        valid_length=lambda n: n,
        weights=weights,
        chunker=lambda member, settings: MdxChunking(params, settings),
    )


def load_network(name: str, device: torch.device, sources: list[str], *, denoise: bool = False,
                 compensate: float | None = None) -> MdxNetwork:
    path = onnx_path(name)
    if path is None:
        if not safe_name(name):
            raise InvalidInput(f"model name {name!r} is not a plain file name")
        hint = (f"bake it with `python builder/bake_models.py --models {name}`"
                if name in NAMED else f"put {name}.onnx (and {name}.json) in MODELS_DIR")
        raise ModelUnavailable(f"MDX-Net model {name!r} is not in MODELS_DIR "
                               f"({config.models_dir()}); {hint}")
    params = resolve_params(name, path)
    return MdxNetwork(make_session(path, device), params, device, sources, denoise=denoise,
                      compensate=compensate)


def load_mdx(name: str, device: torch.device) -> LoadedModel:
    sources = [VOCALS, INSTRUMENTAL]
    network = load_network(name, device, sources, denoise=config.mdx_denoise())
    return LoadedModel(
        name=name,
        sources=sources,
        samplerate=SAMPLERATE,
        audio_channels=2,
        members=[mdx_member(network, network.params, [1.0, 1.0])],
        device=device,
        default_overlap=DEFAULT_OVERLAP,
        uses_shifts=False,
    )
