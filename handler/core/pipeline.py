"""One pipeline for every entry point: decode → separate → encode, streamed block by block.

Fetching and storing are the callers' (the CLI reads local files or URLs; the worker reads
URLs/S3 and uploads); this module turns one local input file into stem files in a directory.
Memory is bounded by the engine's few chunks, whatever the track's length.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from handler import config
from handler.core.decode import AudioInfo, DecodeStats, iter_blocks, probe
from handler.core.encode import FORMATS, MP3_BITRATES, EncodedFile, Writer, open_writer
from handler.core.engine import EngineOptions, Separator
from handler.core.models import INSTRUMENTAL, VOCALS, LoadedModel, get_model
from handler.core.models.demucs_family import max_segment
from handler.errors import InvalidInput, TooLong, WorkerError

log = logging.getLogger(__name__)

ALL_STEMS = "all"


@dataclass
class SeparationRequest:
    """The options every entry point shares, under demucs's names where demucs has one."""

    model: str | None = None  # None: DEFAULT_MODEL
    stems: list[str] = field(default_factory=lambda: [INSTRUMENTAL])  # or ["all"]
    output_format: str = "mp3"
    mp3_bitrate: int = 192
    channels: int = 1
    shifts: int | None = None  # None: the model's default (demucs 1, MSST 0)
    overlap: float | None = None  # None: the model's default (demucs: 0.25)
    num_overlap: int | None = None  # MSST families only: None = the model's YAML
    segment: float | None = None
    interval_cut: list[float] = field(default_factory=list)  # seconds: one file per interval
    seed: int = 0


@dataclass
class StemOutput:
    stem: str
    file: EncodedFile
    interval: int | None = None  # index when interval_cut splits the output
    start_s: float = 0.0

    def describe(self) -> dict:
        out = {
            "stem": self.stem,
            "format": self.file.format,
            "channels": self.file.channels,
            "sample_rate": self.file.sample_rate,
            "bitrate": self.file.bitrate,
            "duration_s": round(self.file.duration_s, 6),
            "bytes": self.file.bytes,
        }
        if self.interval is not None:
            out.update(interval=self.interval, start_s=round(self.start_s, 6))
        return out


@dataclass
class SeparationResult:
    model: str
    outputs: list[StemOutput]
    input: AudioInfo
    input_duration_s: float
    timings_s: dict[str, float]
    warnings: list[str]


# progress(stage, completed, total): stage is "decode" | "separate" | "encode"
ProgressFn = Callable[[str, int, int], None]


def resolve_stems(model: LoadedModel, stems: list[str]) -> list[str]:
    if not stems:
        raise InvalidInput("stems must name at least one stem")
    if ALL_STEMS in stems:
        return model.stems
    unknown = [s for s in stems if s not in model.stems]
    if unknown:
        raise InvalidInput(
            f"model {model.name} has no stem {', '.join(map(repr, unknown))}; "
            f"it offers: {', '.join(model.stems)}"
        )
    return list(dict.fromkeys(stems))


def validate(req: SeparationRequest, model: LoadedModel) -> None:
    if req.output_format not in FORMATS:
        raise InvalidInput(f"output_format must be one of {', '.join(FORMATS)}")
    if req.output_format == "mp3" and req.mp3_bitrate not in MP3_BITRATES:
        raise InvalidInput(f"mp3_bitrate must be one of {MP3_BITRATES}")
    if req.channels not in (1, 2):
        raise InvalidInput("channels must be 1 or 2")
    if req.shifts is not None and not 0 <= req.shifts <= 20:
        raise InvalidInput("shifts must be between 0 and 20")
    if req.num_overlap is not None and not 1 <= req.num_overlap <= 64:
        raise InvalidInput("num_overlap must be between 1 and 64")
    if req.overlap is not None and not 0 <= req.overlap <= 0.95:
        raise InvalidInput("overlap must be between 0 and 0.95")
    if req.segment is not None:
        limit = max_segment(model)
        if req.segment <= 0.5 or (limit is not None and req.segment > limit + 1e-6):
            bound = f"{limit:.2f}" if limit is not None else "unbounded"
            raise InvalidInput(f"segment must be > 0.5 s and at most {bound} s for {model.name}")
    if any(c <= 0 for c in req.interval_cut):
        raise InvalidInput("interval_cut points must be positive seconds")


def _stem_matrix(model: LoadedModel, stems: list[str]) -> np.ndarray:
    """(stems, sources) 0/1 matrix: each requested stem as a sum of model sources."""
    matrix = np.zeros((len(stems), len(model.sources)), np.float32)
    for i, stem in enumerate(stems):
        if stem == INSTRUMENTAL:
            if "accompaniment" in model.sources:  # spleeter already gives it
                matrix[i, model.sources.index("accompaniment")] = 1
            else:
                matrix[i] = [0 if s == VOCALS else 1 for s in model.sources]
        else:
            matrix[i, model.sources.index(stem)] = 1
    return matrix


class _SplitWriter:
    """Routes samples to one writer per interval: cuts move where files end, not how audio is
    separated, so there is no seam at a cut (the predecessor separated each part alone)."""

    def __init__(self, make: Callable[[int | None], Writer], cuts: list[int]):
        self.make = make
        self.cuts = cuts  # sample positions, ascending
        self.pos = 0
        self.index = 0
        self.current = make(0 if cuts else None)
        self.closed: list[EncodedFile] = []

    def write(self, block: np.ndarray) -> None:
        while block.shape[-1]:
            if self.index < len(self.cuts):
                room = self.cuts[self.index] - self.pos
                if room <= 0:
                    self.closed.append(self.current.close())
                    self.index += 1
                    self.current = self.make(self.index)
                    continue
                part, block = block[..., :room], block[..., room:]
            else:
                part, block = block, block[..., :0]
            self.current.write(part)
            self.pos += part.shape[-1]

    def close(self) -> list[EncodedFile]:
        self.closed.append(self.current.close())
        return self.closed

    def abort(self) -> None:
        self.current.abort()
        for f in self.closed:
            f.path.unlink(missing_ok=True)


def separate_file(
    path: Path,
    out_dir: Path,
    req: SeparationRequest,
    *,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_duration_s: float | None = None,
) -> SeparationResult:
    """Separate one local audio file into ``out_dir/<stem>[_NNN].<ext>``."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    info = probe(path)
    limit = config.max_duration_s() if max_duration_s is None else max_duration_s
    if info.duration_s > limit:
        raise TooLong(f"input is {info.duration_s:.0f} s long; the limit is {limit:.0f} s")
    timings["decode"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = get_model(req.model or config.default_model())
    validate(req, model)
    stems = resolve_stems(model, req.stems)
    timings["model"] = time.perf_counter() - t0

    rate = model.samplerate
    expected = round(info.duration_s * rate) or None
    cuts = sorted({r for c in req.interval_cut if (r := round(c * rate)) > 0})
    out_dir.mkdir(parents=True, exist_ok=True)
    ext = req.output_format
    writers: list[_SplitWriter] = []
    for stem in stems:
        def make(index: int | None, stem: str = stem) -> Writer:
            name = stem if index is None else f"{stem}_{index:03d}"
            return open_writer(out_dir / f"{name}.{ext}", ext, rate, req.channels, req.mp3_bitrate)
        writers.append(_SplitWriter(make, cuts))
    matrix = _stem_matrix(model, stems)

    opts = EngineOptions(
        shifts=model.default_shifts if req.shifts is None else req.shifts,
        segment=req.segment, seed=req.seed, num_overlap=req.num_overlap,
        overlap=model.default_overlap if req.overlap is None else req.overlap,
        batch_size=config.env_int("BATCH_SIZE", model.default_batch_size
                                  or (4 if model.device.type == "cuda" else 1)),
    )
    stats = DecodeStats()
    max_samples = int(limit * rate) + rate  # the container may under-report its duration

    def blocks():
        for block in iter_blocks(path, rate=rate, channels=model.audio_channels, stats=stats):
            if stats.samples_out > max_samples:
                raise TooLong(f"input is longer than the {limit:.0f} s limit")
            yield block

    def on_chunk(done: int, total: int) -> None:
        if progress is not None:
            progress("separate", done, total)

    t0 = time.perf_counter()
    encode_s = 0.0
    try:
        for out in Separator(model, opts).run(
            blocks(), expected_samples=expected, progress=on_chunk, should_stop=should_stop
        ):
            t1 = time.perf_counter()
            mixed = np.tensordot(matrix, out, axes=(1, 0))  # (stems, C, n)
            for writer, audio in zip(writers, mixed, strict=True):
                writer.write(audio)
            del out, mixed, audio  # free before the next chunk's activations are allocated
            encode_s += time.perf_counter() - t1
        t1 = time.perf_counter()
        files = [w.close() for w in writers]
        encode_s += time.perf_counter() - t1
    except BaseException as exc:
        # libsndfile (WAV/FLAC) reports a full disk as a bare "System error": look at the
        # disk before the aborted files free it, and say what happened.
        full = not isinstance(exc, (OSError, WorkerError)) and _disk_full(out_dir)
        for w in writers:
            w.abort()
        if full:
            raise OSError(errno.ENOSPC, "No space left on device") from exc
        raise
    timings["separate"] = time.perf_counter() - t0 - encode_s
    timings["encode"] = encode_s
    if progress is not None:
        progress("encode", 1, 1)

    outputs = []
    for stem, stem_files in zip(stems, files, strict=True):
        for i, f in enumerate(stem_files):
            start = (0 if i == 0 else cuts[i - 1]) / rate
            outputs.append(StemOutput(stem, f, i if cuts else None, start))
    return SeparationResult(
        model=model.name,
        outputs=outputs,
        input=info,
        input_duration_s=stats.samples_out / rate,
        timings_s={k: round(v, 3) for k, v in timings.items()},
        warnings=stats.warnings,
    )


def _disk_full(path: Path) -> bool:
    """Less than 1 MiB left on the file system of ``path``."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1024 * 1024
