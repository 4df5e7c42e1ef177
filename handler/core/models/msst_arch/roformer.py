"""BS-RoFormer and Mel-Band RoFormer (band-split / mel-band axial transformers on a complex STFT).

Constructor keywords are the MSST YAML's ``model`` section (``Class(**config.model)``); the
training-only ones (multi-resolution STFT loss, checkpointing, sage attention) are accepted and
ignored. ``zero_dc`` is accepted and not applied: audio-separator 0.47.1 ignores it too, and
its behaviour (not the training repo's newer default) is the reference.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from handler.core.models.msst_arch.layers import (
    BandSplit,
    MaskEstimator,
    RMSNorm,
    Rotary,
    Transformer,
    no_autocast,
)

# Keywords that only matter for training (or for other forks) and leave inference unchanged.
TRAINING_ONLY = frozenset({
    "multi_stft_resolution_loss_weight", "multi_stft_resolutions_window_sizes",
    "multi_stft_hop_size", "multi_stft_normalized", "multi_stft_window_fn",
    "use_torch_checkpoint", "sage_attention", "zero_dc", "attn_dropout", "ff_dropout",
})


class _SpectralRoformer(nn.Module):
    """What both RoFormers share: STFT in, axial transformer stack, complex mask, iSTFT out."""

    def __init__(self, *, dim: int, depth: int, stereo: bool, num_stems: int,
                 time_transformer_depth: int, freq_transformer_depth: int,
                 linear_transformer_depth: int, dim_head: int, heads: int, flash_attn: bool,
                 stft_n_fft: int, stft_hop_length: int, stft_win_length: int,
                 stft_normalized: bool, norm_output: bool, skip_connection: bool,
                 training_only: dict):
        super().__init__()
        _reject_unknown(training_only)
        if skip_connection:
            raise ValueError("skip_connection: true is not supported")
        self.audio_channels = 2 if stereo else 1
        self.num_stems = num_stems
        common = dict(dim=dim, heads=heads, dim_head=dim_head, attn_dropout=0.0, ff_dropout=0.0,
                      flash_attn=flash_attn, norm_output=norm_output)
        time_rotary, freq_rotary = Rotary(dim_head), Rotary(dim_head)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            block = []
            if linear_transformer_depth > 0:
                block.append(Transformer(depth=linear_transformer_depth, linear_attn=True,
                                         **common))
            block.append(Transformer(depth=time_transformer_depth, rotary=time_rotary, **common))
            block.append(Transformer(depth=freq_transformer_depth, rotary=freq_rotary, **common))
            self.layers.append(nn.ModuleList(block))
        self.n_fft, self.hop_length, self.win_length = stft_n_fft, stft_hop_length, stft_win_length
        self.stft_normalized = stft_normalized
        self.num_freqs = stft_n_fft // 2 + 1
        self._window: torch.Tensor | None = None

    # -- spectra --------------------------------------------------------------------------
    def window(self, device: torch.device) -> torch.Tensor:
        if self._window is None or self._window.device != device:
            self._window = torch.hann_window(self.win_length, device=device)
        return self._window

    def stft(self, audio: torch.Tensor) -> torch.Tensor:
        """(b, s, t) -> (b, f*s, frames, 2) float32, channels interleaved per frequency."""
        b, s, t = audio.shape
        with no_autocast(audio.device):
            spec = torch.stft(audio.float().reshape(b * s, t), self.n_fft, self.hop_length,
                              self.win_length, self.window(audio.device),
                              normalized=self.stft_normalized, return_complex=True)
        spec = torch.view_as_real(spec)  # (b s) f frames 2
        f, frames = spec.shape[1], spec.shape[2]
        return spec.view(b, s, f, frames, 2).transpose(1, 2).reshape(b, f * s, frames, 2)

    def istft(self, spec: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """(b, n, f*s, frames) complex -> (b, n, s, samples)."""
        b, n, fs, frames = spec.shape
        s = self.audio_channels
        spec = spec.view(b, n, fs // s, s, frames).transpose(2, 3)
        spec = spec.reshape(b * n * s, fs // s, frames)
        with no_autocast(spec.device):
            audio = torch.istft(spec, self.n_fft, self.hop_length, self.win_length,
                                self.window(spec.device), normalized=self.stft_normalized,
                                length=length)
        return audio.view(b, n, s, -1)

    def axial(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, t, bands, d) through every block: linear (all tokens), time, frequency."""
        b, t, nb, d = x.shape
        for block in self.layers:
            if len(block) == 3:
                x = block[0](x.reshape(b, t * nb, d)).view(b, t, nb, d)
            time_tr, freq_tr = block[-2], block[-1]
            x = time_tr(x.transpose(1, 2).reshape(b * nb, t, d))
            x = x.view(b, nb, t, d).transpose(1, 2).reshape(b * t, nb, d)
            x = freq_tr(x).view(b, t, nb, d)
        return x

    def masks(self, x: torch.Tensor, estimators: nn.ModuleList) -> torch.Tensor:
        """(b, t, bands, d) -> complex (b, stems, F, t) in float32."""
        m = torch.stack([est(x) for est in estimators], dim=1)  # b n t (F 2)
        b, n, t, _ = m.shape
        m = m.float().view(b, n, t, -1, 2).transpose(2, 3).contiguous()
        return torch.view_as_complex(m)


class BSRoformer(_SpectralRoformer):
    def __init__(self, dim: int, *, depth: int, freqs_per_bands: tuple[int, ...],
                 stereo: bool = False, num_stems: int = 1, time_transformer_depth: int = 2,
                 freq_transformer_depth: int = 2, linear_transformer_depth: int = 0,
                 dim_head: int = 64, heads: int = 8, flash_attn: bool = True,
                 mlp_expansion_factor: int = 4, skip_connection: bool = False,
                 dim_freqs_in: int = 1025, stft_n_fft: int = 2048, stft_hop_length: int = 512,
                 stft_win_length: int = 2048, stft_normalized: bool = False,
                 mask_estimator_depth: int = 2, **training_only):
        super().__init__(dim=dim, depth=depth, stereo=stereo, num_stems=num_stems,
                         time_transformer_depth=time_transformer_depth,
                         freq_transformer_depth=freq_transformer_depth,
                         linear_transformer_depth=linear_transformer_depth, dim_head=dim_head,
                         heads=heads, flash_attn=flash_attn, stft_n_fft=stft_n_fft,
                         stft_hop_length=stft_hop_length, stft_win_length=stft_win_length,
                         stft_normalized=stft_normalized, norm_output=False,
                         skip_connection=skip_connection, training_only=training_only)
        freqs_per_bands = tuple(int(f) for f in freqs_per_bands)
        if len(freqs_per_bands) < 2 or sum(freqs_per_bands) != self.num_freqs:
            raise ValueError(f"freqs_per_bands must have 2+ bands summing to {self.num_freqs} "
                             f"(n_fft {stft_n_fft}), got {sum(freqs_per_bands)}")
        self.final_norm = RMSNorm(dim)
        dims = tuple(2 * f * self.audio_channels for f in freqs_per_bands)
        self.band_split = BandSplit(dim, dims)
        self.mask_estimators = nn.ModuleList(
            MaskEstimator(dim, dims, mask_estimator_depth - 1, mlp_expansion_factor)
            for _ in range(num_stems))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """(b, s, t) -> (b, stems, s, t')."""
        spec = self.stft(audio)  # b F frames 2
        b, fs, frames, _ = spec.shape
        x = spec.transpose(1, 2).reshape(b, frames, fs * 2)
        mix = torch.view_as_complex(spec.contiguous()).unsqueeze(1)
        return self.istft(mix * self.core(x))

    def core(self, x: torch.Tensor) -> torch.Tensor:
        """(b, frames, F*2) spectral features -> complex masks (b, stems, F, frames)."""
        return self.masks(self.final_norm(self.axial(self.band_split(x))), self.mask_estimators)


def mel_band_membership(sample_rate: int, n_fft: int, num_bands: int) -> np.ndarray:
    """(num_bands, n_fft//2+1) bool: which STFT bins each mel band covers.

    The support of librosa 0.11's ``filters.mel`` (Slaney scale and norm, float32), with the
    first bin of the first band and the last bin of the last band forced on, as the model does;
    computed here so that librosa (and numba) is not a runtime dependency. Equality with
    librosa's is tested.
    """
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0

    def hz_to_mel(f: float) -> float:
        return f / f_sp if f < min_log_hz else min_log_mel + np.log(f / min_log_hz) / logstep

    mels = np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2.0), num_bands + 2)
    mel_f = f_sp * mels
    log_t = mels >= min_log_mel
    mel_f[log_t] = min_log_hz * np.exp(logstep * (mels[log_t] - min_log_mel))
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((num_bands, len(fftfreqs)), np.float32)
    for i in range(num_bands):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:num_bands + 2] - mel_f[:num_bands]))[:, None]
    weights[0, 0] = 1.0
    weights[-1, -1] = 1.0
    return weights > 0


class MelBandRoformer(_SpectralRoformer):
    def __init__(self, dim: int, *, depth: int, num_bands: int = 60, stereo: bool = False,
                 num_stems: int = 1, time_transformer_depth: int = 2,
                 freq_transformer_depth: int = 2, dim_head: int = 64, heads: int = 8,
                 flash_attn: bool = True, mlp_expansion_factor: int = 4,
                 skip_connection: bool = False, dim_freqs_in: int = 1025,
                 sample_rate: int = 44100, stft_n_fft: int = 2048, stft_hop_length: int = 512,
                 stft_win_length: int = 2048, stft_normalized: bool = False,
                 mask_estimator_depth: int = 1, match_input_audio_length: bool = False,
                 **training_only):
        super().__init__(dim=dim, depth=depth, stereo=stereo, num_stems=num_stems,
                         time_transformer_depth=time_transformer_depth,
                         freq_transformer_depth=freq_transformer_depth,
                         linear_transformer_depth=0, dim_head=dim_head, heads=heads,
                         flash_attn=flash_attn, stft_n_fft=stft_n_fft,
                         stft_hop_length=stft_hop_length, stft_win_length=stft_win_length,
                         stft_normalized=stft_normalized, norm_output=True,
                         skip_connection=skip_connection, training_only=training_only)
        self.match_input_audio_length = match_input_audio_length
        member = torch.from_numpy(mel_band_membership(sample_rate, stft_n_fft, num_bands))
        if not bool(member.any(dim=0).all()):
            raise ValueError(f"num_bands {num_bands} leaves STFT bins uncovered")
        freq_indices = torch.arange(self.num_freqs).expand(num_bands, -1)[member]
        s = self.audio_channels
        freq_indices = (freq_indices[:, None] * s + torch.arange(s)).reshape(-1)
        self.register_buffer("freq_indices", freq_indices, persistent=False)
        bands_per_freq = member.sum(dim=0).repeat_interleave(s).float()
        self.register_buffer("bands_per_freq", bands_per_freq, persistent=False)
        dims = tuple(2 * int(f) * s for f in member.sum(dim=1).tolist())
        self.band_split = BandSplit(dim, dims)
        self.mask_estimators = nn.ModuleList(
            MaskEstimator(dim, dims, mask_estimator_depth, mlp_expansion_factor)
            for _ in range(num_stems))

    def core(self, x: torch.Tensor) -> torch.Tensor:
        """(b, frames, F'*2) band-gathered features -> complex masks (b, stems, F', frames)."""
        return self.masks(self.axial(self.band_split(x)), self.mask_estimators)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """(b, s, t) -> (b, stems, s, t') (t' = t when match_input_audio_length)."""
        spec = self.stft(audio)  # b F frames 2
        b, fs, frames, _ = spec.shape
        x = spec[:, self.freq_indices].transpose(1, 2).reshape(b, frames, -1)
        masks = self.core(x)  # b n F' t, F' with overlaps
        summed = masks.new_zeros(b, masks.shape[1], fs, frames)
        summed.index_add_(2, self.freq_indices, masks)
        averaged = summed / self.bands_per_freq.clamp(min=1e-8)[:, None]
        length = audio.shape[-1] if self.match_input_audio_length else None
        return self.istft(torch.view_as_complex(spec.contiguous()).unsqueeze(1) * averaged, length)


def _reject_unknown(kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - TRAINING_ONLY)
    if unknown:
        raise TypeError(f"unsupported model keys: {', '.join(unknown)}")
