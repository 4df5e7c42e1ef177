"""``demucs-separate``: the pipeline from the command line (local files or URLs).

    demucs-separate --input song.mp3 --output out/            # out/instrumental.mp3
    demucs-separate --input https://... --output out/ --all-stems --format flac
    demucs-separate --input long.wav --output out/ --interval-cut 300,600   # 3 files per stem

``--interval-cut`` keeps the predecessor's cut points but separates the track as one: the
output of each stem is split into one file per interval (``<stem>_000.mp3``, ...), with no
seam at a cut. ``--progress-file`` keeps the predecessor's progress JSON up to date.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from handler import config
from handler.adapters.progress_file import ProgressFile
from handler.core.encode import FORMATS
from handler.core.pipeline import ALL_STEMS, SeparationRequest, separate_file
from handler.errors import InvalidInput, WorkerError, as_worker_error

log = logging.getLogger("demucs-separate")


def parse_cuts(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        return [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        msg = f"--interval-cut must be comma-separated seconds, got {text!r}"
        raise InvalidInput(msg) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="demucs-separate",
        description="Separate vocals and instrumental (or every stem) from an audio file or URL.",
    )
    p.add_argument("--input", "-i", required=True, help="audio file path or http(s) URL")
    p.add_argument("--output", "-o", required=True, type=Path, help="output directory")
    p.add_argument("--model", "-n", default=None,
                   help=f"model name (default: $DEFAULT_MODEL = {config.default_model()})")
    stems = p.add_mutually_exclusive_group()
    stems.add_argument("--stems", default="instrumental",
                       help="comma-separated stems: instrumental, vocals, drums, bass, other, ...")
    stems.add_argument("--all-stems", action="store_true", help="write every stem")
    p.add_argument("--format", choices=FORMATS, default="mp3")
    p.add_argument("--mp3-bitrate", type=int, default=192)
    p.add_argument("--channels", type=int, choices=(1, 2), default=1)
    p.add_argument("--shifts", type=int, default=None,
                   help="demucs shift trick (0 = off; default: the model's, 1 for demucs)")
    p.add_argument("--num-overlap", type=int, default=None,
                   help="MSST models: chunks covering each sample (default: the model's YAML)")
    p.add_argument("--overlap", type=float, default=None,
                   help="chunk overlap (default: the model's, 0.25 for demucs)")
    p.add_argument("--segment", type=float, default=None, help="chunk length in seconds")
    p.add_argument("--seed", type=int, default=0, help="seed of the shift offsets")
    p.add_argument("--interval-cut", default=None,
                   help='cut points in seconds, e.g. "300,600,900": one output file per interval')
    p.add_argument("--progress-file", type=Path, default=None,
                   help="keep a progress JSON (predecessor format) at this path")
    p.add_argument("--endpoint", default=None,
                   help="run on a RunPod endpoint with this ID instead of locally")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging, tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    progress_file = ProgressFile(args.progress_file) if args.progress_file else None
    try:
        req = SeparationRequest(
            model=args.model,
            stems=[ALL_STEMS] if args.all_stems else [s.strip() for s in args.stems.split(",")],
            output_format=args.format,
            mp3_bitrate=args.mp3_bitrate,
            channels=args.channels,
            shifts=args.shifts,
            overlap=args.overlap,
            num_overlap=args.num_overlap,
            segment=args.segment,
            interval_cut=parse_cuts(args.interval_cut),
            seed=args.seed,
        )
        if args.endpoint:
            from handler.adapters.remote import run_remote

            paths = run_remote(args.endpoint, args.input, args.output, req, quiet=args.quiet)
        else:
            paths = run_local(args.input, args.output, req, progress_file, quiet=args.quiet)
    except KeyboardInterrupt:
        if progress_file:
            progress_file.failed("interrupted")
        print("demucs-separate: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, typed, no traceback for expected failures
        err = as_worker_error(exc)
        if not isinstance(exc, WorkerError):
            log.debug("unexpected failure", exc_info=True)
        if progress_file:
            progress_file.failed(str(err))
        print(f"demucs-separate: {err}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def run_local(
    source: str, out_dir: Path, req: SeparationRequest, progress_file: ProgressFile | None,
    *, quiet: bool = False,
) -> list[Path]:
    from tqdm import tqdm

    bar = tqdm(total=0, unit="chunk", disable=quiet or not sys.stderr.isatty(), file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="demucs-separate-"))
    try:
        if progress_file:
            progress_file.task("cutting", "running")
        path = fetch_input(source, tmp)

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "separate":
                if progress_file:
                    if progress_file.tasks["models"] != "done":
                        progress_file.task("models", "done")
                        progress_file.task("cutting", "done")
                        progress_file.task("inference", "running")
                        progress_file.task("conversion", "running")
                    progress_file.segments(done, total)
                bar.total = total
                bar.n = done
                bar.refresh()

        if progress_file:
            progress_file.task("models", "running")
        work = tmp / "out"
        result = separate_file(path, work, req, progress=progress)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for output in result.outputs:
            dest = out_dir / output.file.path.name
            shutil.move(str(output.file.path), dest)
            written.append(dest)
        for warning in result.warnings:
            print(f"demucs-separate: warning: {warning}", file=sys.stderr)
        if progress_file:
            progress_file.completed([str(p) for p in written])
        return written
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_input(source: str, tmp: Path) -> Path:
    if source.startswith(("http://", "https://")):
        from handler.transfer.http import download

        # A local CLI user may fetch from their own network: no private-address guard here.
        return download(source, tmp / "input", allow_private=True).path
    if "://" in source:
        raise InvalidInput("--input must be a file path or an http(s) URL")
    path = Path(source).expanduser()
    if not path.is_file():
        raise InvalidInput(f"input file not found: {source}")
    return path


if __name__ == "__main__":
    sys.exit(main())
