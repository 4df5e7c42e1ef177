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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from handler import config
from handler.core.decode import AudioInfo, DecodeStats, iter_blocks, probe
from handler.core.encode import EncodedFile, Writer, open_writer
from handler.core.engine import EngineOptions, Separator
from handler.core.models import INSTRUMENTAL, VOCALS, LoadedModel, get_model
from handler.core.progress import ProgressFn
from handler.core.request import SeparationRequest, output_name
from handler.errors import InvalidInput, TooLong, WorkerError

log = logging.getLogger(__name__)


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


@dataclass
class Prepared:
    """A request checked against its loaded model, once: what ``separate_file`` runs."""

    request: SeparationRequest
    model: LoadedModel
    stems: list[str]


def prepare(req: SeparationRequest) -> Prepared:
    """Load the request's model and check what only the model can tell (stems, segment)."""
    model = get_model(req.model or config.default_model())
    limit = model.max_segment
    if req.segment is not None and limit is not None and req.segment > limit + 1e-6:
        raise InvalidInput(f"segment must be > 0.5 s and at most {limit:.2f} s for {model.name}")
    if not req.stems:
        raise InvalidInput("stems must name at least one stem")
    if req.all_stems:
        # Spleeter's "accompaniment" source *is* the instrumental: "all" writes it once, as
        # instrumental (asking for accompaniment by name still works).
        stems = [s for s in model.stems
                 if not (s == "accompaniment" and INSTRUMENTAL in model.stems)]
    else:
        unknown = [s for s in req.stems if s not in model.stems]
        if unknown:
            raise InvalidInput(
                f"model {model.name} has no stem {', '.join(map(repr, unknown))}; "
                f"it offers: {', '.join(model.stems)}"
            )
        stems = list(dict.fromkeys(req.stems))
    return Prepared(req, model, stems)


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
    req: SeparationRequest | Prepared,
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
    prepared = req if isinstance(req, Prepared) else prepare(req)
    req, model, stems = prepared.request, prepared.model, prepared.stems
    timings["model"] = time.perf_counter() - t0

    separator = _separator(prepared)
    _check_work(separator, req, info.duration_s)

    rate = model.samplerate
    expected = round(info.duration_s * rate) or None
    cuts = sorted({r for c in req.interval_cut if (r := round(c * rate)) > 0})
    writers = _open_writers(out_dir, prepared, cuts)
    matrix = _stem_matrix(model, stems)

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
        for out in separator.run(
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

    outputs = [
        StemOutput(stem, f, i if cuts else None, (0 if i == 0 else cuts[i - 1]) / rate)
        for stem, stem_files in zip(stems, files, strict=True)
        for i, f in enumerate(stem_files)
    ]
    return SeparationResult(
        model=model.name,
        outputs=outputs,
        input=info,
        input_duration_s=stats.samples_out / rate,
        timings_s={k: round(v, 3) for k, v in timings.items()},
        warnings=stats.warnings,
    )


def _shifts(prepared: Prepared) -> int:
    req, model = prepared.request, prepared.model
    shifts = model.default_shifts if req.shifts is None else req.shifts
    # A family without demucs's shift trick (MDX-Net) would only repeat identical passes.
    return shifts if model.uses_shifts else min(shifts, 1)


def _separator(prepared: Prepared) -> Separator:
    req, model = prepared.request, prepared.model
    return Separator(model, EngineOptions(
        shifts=_shifts(prepared),
        segment=req.segment, seed=req.seed, num_overlap=req.num_overlap,
        overlap=model.default_overlap if req.overlap is None else req.overlap,
        batch_size=config.env_int("BATCH_SIZE", model.default_batch_size
                                  or (4 if model.device.type == "cuda" else 1)),
    ))


def _open_writers(out_dir: Path, prepared: Prepared, cuts: list[int]) -> list[_SplitWriter]:
    """One writer per stem, each split at ``cuts`` into ``<stem>[_NNN].<ext>`` files."""
    req, rate = prepared.request, prepared.model.samplerate
    out_dir.mkdir(parents=True, exist_ok=True)
    ext = req.output_format

    def opener(stem: str) -> Callable[[int | None], Writer]:
        return lambda index: open_writer(out_dir / f"{output_name(stem, index)}.{ext}", ext,
                                         rate, req.channels, req.mp3_bitrate, req.bit_depth)

    return [_SplitWriter(opener(stem), cuts) for stem in prepared.stems]


def _check_work(separator: Separator, req: SeparationRequest, duration_s: float) -> None:
    """Refuse options whose work is out of all proportion to the input (shifts=20,
    overlap=0.95, a tiny segment) before any of it starts."""
    work = separator.work_seconds(max(1, round(duration_s * separator.model.samplerate)))
    budget = max(config.max_work_ratio() * duration_s, config.min_work_budget_s())
    if work > budget:
        raise InvalidInput(
            f"these options would take {work:.0f} s of model work for {duration_s:.1f} s of "
            f"audio (the limit is {budget:.0f} s): lower shifts ({separator.opts.shifts}) "
            f"or overlap "
            f"({req.overlap if req.overlap is not None else 'model default'}), or raise segment "
            f"({req.segment if req.segment is not None else 'model default'})")


def _disk_full(path: Path) -> bool:
    """Less than 1 MiB left on the file system of ``path``."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1024 * 1024
