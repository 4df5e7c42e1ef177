"""Many inputs per ``demucs-separate`` run: expanding the inputs, naming the outputs, sharding,
resuming and recording outcomes. The separation itself is the caller's (``cli.run_local`` one
file at a time, or ``fanout`` through an endpoint); this module only plans and records.

Inputs: files, folders (recursively, audio files only, by extension), globs, http(s) URLs,
``s3://bucket/key`` objects and ``s3://bucket/prefix/`` listings (the worker's ``BUCKET_*``
credentials), and ``--input-list FILE`` (one of those per line, ``#`` comments).

Outputs follow demucs's ``--filename`` template (``{track}``, ``{trackext}``, ``{stem}``,
``{ext}``): one input keeps ``OUT/{stem}.{ext}``, several default to ``OUT/{track}/{stem}.{ext}``.
Two inputs that would write the same file are refused before any work.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from handler.core.request import SeparationRequest, output_name
from handler.errors import InvalidInput

# What a folder or a bucket prefix contributes: audio by extension (covers, notes, .DS_Store
# and the like are left alone). A file named explicitly is taken whatever its extension.
AUDIO_EXTENSIONS = frozenset({
    ".mp3", ".wav", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".mp4", ".aif", ".aiff",
    ".wma", ".webm", ".mka", ".mkv", ".ac3", ".alac", ".caf", ".wv", ".ape",
})
SINGLE_TEMPLATE = "{stem}.{ext}"
MANY_TEMPLATE = "{track}/{stem}.{ext}"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Item:
    """One input: where it comes from and the names its outputs use."""

    source: str  # a local path, an http(s) URL or s3://bucket/key
    track: str  # file name without its extension
    trackext: str  # the extension without its dot ("" if none)

    @property
    def kind(self) -> str:
        if self.source.startswith(("http://", "https://")):
            return "url"
        return "s3" if self.source.startswith("s3://") else "file"


def _item(source: str, name: str) -> Item:
    p = PurePosixPath(name)
    return Item(source, p.stem or p.name or "track", p.suffix.lstrip("."))


def _is_audio(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in AUDIO_EXTENSIONS


def _s3_items(uri: str) -> list[Item]:
    from handler.transfer import s3

    bucket, _, key = uri[5:].partition("/")
    if key and not key.endswith("/"):
        return [_item(uri, key)]  # one object, named explicitly
    settings = s3.S3Settings.from_env()
    client = s3.make_client(settings)
    keys = s3.list_keys(client, bucket, key)
    return [_item(f"s3://{bucket}/{k}", k) for k in keys if _is_audio(k)]


def expand_one(spec: str) -> list[Item]:
    """The items one ``--input`` (or input-list line) stands for, in a stable order."""
    if spec.startswith(("http://", "https://")):
        return [_item(spec, unquote(urlsplit(spec).path.rsplit("/", 1)[-1]))]
    if spec.startswith("s3://"):
        return _s3_items(spec)
    if "://" in spec:
        raise InvalidInput(f"unsupported input {spec!r}: give a path, http(s):// or s3://")
    path = Path(spec).expanduser()
    if path.is_file():
        return [_item(str(path), path.name)]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and _is_audio(p.name))
        return [_item(str(p), p.name) for p in found]
    if _GLOB_CHARS & set(spec) and not path.exists():
        matches = sorted(glob.glob(str(path), recursive=True))
        items: list[Item] = []
        for m in matches:  # audio files only; a matched folder gives its audio files
            if Path(m).is_dir():
                items.extend(expand_one(m))
            elif _is_audio(m):
                items.append(_item(m, Path(m).name))
        return items
    raise InvalidInput(f"input file not found: {spec}")


def read_input_list(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInput(f"--input-list {path}: {exc.strerror or exc}") from None
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def expand_inputs(specs: list[str]) -> list[Item]:
    """Every input, once (the first mention wins), in the order given. A folder or glob that
    yields nothing is an error: a typo should not look like an empty success."""
    items: dict[str, Item] = {}
    for spec in specs:
        found = expand_one(spec)
        if not found:
            raise InvalidInput(f"no audio files in {spec}")
        for item in found:
            items.setdefault(item.source, item)
    return list(items.values())


def parse_shard(text: str) -> tuple[int, int]:
    """``i/N`` (0 <= i < N, i 0-based like JOB_COMPLETION_INDEX / AWS_BATCH_JOB_ARRAY_INDEX)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise InvalidInput(f"--shard must be i/N, e.g. 0/4 (got {text!r})") from None
    if not (n >= 1 and 0 <= i < n):
        raise InvalidInput(f"--shard {text}: need 0 <= i < N")
    return i, n


def shard(items: list[Item], index: int, count: int) -> list[Item]:
    """Shard ``index`` of ``count``: every input lands in exactly one shard, the same one on
    every machine given the same inputs (sorted by source, dealt round-robin: balanced)."""
    ordered = sorted(items, key=lambda it: it.source)
    return ordered[index::count]


def stems_for(req: SeparationRequest, model_stems: list[str] | None) -> list[str]:
    """The stem names an input's outputs will carry (the loaded model's when known)."""
    if model_stems is not None:
        return model_stems
    if not req.all_stems:
        return list(dict.fromkeys(req.stems))
    from handler import config
    from handler.adapters.models_list import STEMS, stem_names

    sources = STEMS.get(req.model or config.default_model())
    if sources is None:
        raise InvalidInput("--all-stems with --endpoint needs a model whose stems are known "
                           "here; name the stems with --stems")
    return stem_names(sources)


@dataclass
class Plan:
    """Each input's output paths by stem (interval files derive from these: ``<stem>_NNN``)."""

    out_dir: Path
    template: str
    outputs: dict[str, dict[str, Path]]  # source -> stem -> path

    def path(self, item: Item, stem: str, interval: int | None = None) -> Path:
        if interval is None:
            return self.outputs[item.source][stem]
        ext = self.outputs[item.source][stem].suffix.lstrip(".")
        return _render(self.template, self.out_dir.resolve(), item, output_name(stem, interval),
                       ext)


def _render(template: str, root: Path, item: Item, stem: str, ext: str) -> Path:
    try:
        name = template.format(track=item.track, trackext=item.trackext, stem=stem, ext=ext)
    except (KeyError, IndexError, ValueError) as exc:
        raise InvalidInput(f"--filename {template!r}: unknown or bad variable {exc}; "
                           "use {track}, {trackext}, {stem}, {ext}") from None
    path = (root / name).resolve()
    if root not in path.parents:
        raise InvalidInput(f"--filename {template!r} leaves the output folder for {item.source}")
    return path


def plan_outputs(items: list[Item], out_dir: Path, template: str | None, stems: list[str],
                 ext: str) -> Plan:
    """Every output path, checked before any work: inside ``out_dir``, one writer each."""
    template = template or (SINGLE_TEMPLATE if len(items) == 1 else MANY_TEMPLATE)
    owners: dict[Path, tuple[Item, str]] = {}
    outputs: dict[str, dict[str, Path]] = {}
    root = out_dir.resolve()
    for item in items:
        outputs[item.source] = {}
        for stem in stems:
            path = _render(template, root, item, stem, ext)
            if path in owners:
                other, other_stem = owners[path]
                if other is item:
                    raise InvalidInput(f"--filename {template!r} gives stems {other_stem} and "
                                       f"{stem} the same file: include {{stem}}")
                raise InvalidInput(
                    f"{other.source} and {item.source} would both write {path}; rename one, or "
                    "use a --filename that tells them apart (e.g. "
                    "'{track}_{trackext}/{stem}.{ext}')")
            owners[path] = (item, stem)
            outputs[item.source][stem] = path
    return Plan(out_dir, template, outputs)


# --- outcomes, the manifest and resuming --------------------------------------------------

@dataclass
class Outcome:
    source: str
    status: str  # done | skipped | failed | cancelled (| submitted: a job sent, in the manifest)
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    job_id: str | None = None


class Manifest:
    """``--manifest out/manifest.jsonl``: one JSON line per input outcome, appended (flushed
    line by line, so an interrupted run keeps every finished line). The last line for a
    source is its current state."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self.previous: dict[str, dict] = {}
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash
                if isinstance(rec, dict) and isinstance(rec.get("source"), str):
                    self.previous[rec["source"]] = rec

    def record(self, outcome: Outcome) -> None:
        if self.path is None:
            return
        line = json.dumps({**asdict(outcome), "time": round(time.time(), 3)})
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(line + "\n")


def completed_outputs(item: Item, plan: Plan, req: SeparationRequest,
                      manifest: Manifest) -> list[Path] | None:
    """The outputs of an input already done, or None. Outputs are moved into place whole
    (``place``), so an existing file is a complete one. With interval cuts the number of
    files depends on the track: the manifest's record of the run that wrote them decides."""
    if req.interval_cut:
        rec = manifest.previous.get(item.source)
        if not rec or rec.get("status") not in ("done", "skipped") or not rec.get("outputs"):
            return None
        paths = [Path(p) for p in rec["outputs"]]
        return paths if all(p.is_file() for p in paths) else None
    paths = list(plan.outputs[item.source].values())
    return paths if all(p.is_file() for p in paths) else None


def place(src: Path, dest: Path) -> None:
    """Move a finished output into place atomically (a partial file is never at ``dest``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.part")
    shutil.move(str(src), part)
    os.replace(part, dest)


def run_pool(items: list[Item], one: Callable[[Item], Outcome], workers: int,
             manifest: Manifest, bar, *, name: str, line: Callable[[Outcome], str],
             on_interrupt: Callable[[], None]) -> list[Outcome]:
    """``one(item)`` for every item on up to ``workers`` threads, each outcome recorded and
    shown as it finishes. An interrupt drops what has not started, calls ``on_interrupt``
    (stop the running ones at their next step), waits for them, then re-raises."""
    results: list[Outcome] = []
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    pending: set[Future] = set()
    try:
        pending = {pool.submit(one, item) for item in items}
        while pending:
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in finished:
                outcome = fut.result()
                results.append(outcome)
                manifest.record(outcome)
                bar.update(1)
                bar.write(line(outcome) + (f"  {outcome.error}" if outcome.error else ""),
                          file=sys.stderr)
    except BaseException:
        for fut in pending:
            fut.cancel()
        on_interrupt()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def summary_table(outcomes: list[Outcome]) -> str:
    """The closing table: one row per input, then the totals."""
    rows = [("status", "seconds", "input", "outputs / error")]
    for o in outcomes:
        detail = o.error if o.error else f"{len(o.outputs)} file(s)"
        rows.append((o.status, f"{o.seconds:.1f}", o.source, detail or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no inputs")
    return "\n".join(lines)
