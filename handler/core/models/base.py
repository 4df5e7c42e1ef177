"""The one interface every model family implements for the chunked engine.

A model is a list of *members* (one for a single network, several for a demucs bag of
models). Each member separates a fixed-size chunk; the engine (``handler.separate``) does the
chunking, overlap-add and member/shift averaging, so it is shared by every family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from handler.core.chunking import ChunkRule, ChunkSettings, DemucsChunking

VOCALS = "vocals"
INSTRUMENTAL = "instrumental"

# Precision -> autocast dtype of each forward pass. bf16/fp16 pay on GPUs and on CPUs with
# native bf16 (AVX512-BF16/AMX); elsewhere PyTorch emulates bf16, many times slower. fp32 keeps
# the output equal to demucs's own to float rounding. (Measured and dropped: dynamic int8
# quantization of the transformer's nn.Linear layers, no whole-job gain, +120 MB RSS.)
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16,
}


@dataclass
class Member:
    """One network of a model.

    forward: (batch, audio_channels, valid_length(n)) -> (batch, sources, audio_channels, same).
    segment_length: chunk length in samples at the model's rate (before overlap).
    valid_length: input length the network wants for a chunk of ``n`` real samples; the chunk
        is centred in that window with the neighbouring audio (as demucs's ``TensorChunk.padded``).
    weights: per-source weight of this member in the bag (demucs bag semantics).
    chunker: the family's chunking rule for a job's settings (None: demucs's crossfade).
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    segment_length: int
    valid_length: Callable[[int], int]
    weights: list[float]
    module: torch.nn.Module | None = None
    # HTDemucs always runs on its full training window, whatever the chunk's real length.
    pad_to_segment: bool = False
    chunker: Callable[[Member, ChunkSettings], ChunkRule] | None = None

    def chunking(self, settings: ChunkSettings) -> ChunkRule:
        if self.chunker is not None:
            return self.chunker(self, settings)
        return DemucsChunking(settings, self.valid_length, self.pad_to_segment)


@dataclass
class LoadedModel:
    name: str
    sources: list[str]
    samplerate: int
    audio_channels: int
    members: list[Member]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    default_overlap: float = 0.25  # demucs's; a job's ``overlap`` overrides it
    # demucs's shift trick is on by default; families whose reference runs none (MSST) say 0.
    default_shifts: int = 1
    default_batch_size: int | None = None  # chunks per forward; None: BATCH_SIZE's default
    precision: str = "fp32"  # one of PRECISIONS (the PRECISION setting)
    # demucs's shift trick; False: the family has none, a job's shifts > 1 would only repeat
    # identical passes (the pipeline runs one).
    uses_shifts: bool = True

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]

    @property
    def max_segment(self) -> float | None:
        """Longest chunk (seconds) every member can run: networks that only run on their
        training window (HTDemucs) cannot take longer ones."""
        limits = [m.segment_length / self.samplerate for m in self.members if m.pad_to_segment]
        return min(limits) if limits else None

    @property
    def stems(self) -> list[str]:
        """Names a caller may ask for: the model's sources plus ``instrumental`` when the model
        has a vocals source (instrumental = the sum of every other source)."""
        names = list(self.sources)
        if VOCALS in self.sources and INSTRUMENTAL not in names:
            names.insert(0, INSTRUMENTAL)
        return names
