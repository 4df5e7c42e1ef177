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

from handler.adapters.interrupt import Interrupted, interruptible
from handler.adapters.progress_file import ProgressFile
from handler.core.pipeline import separate_file
from handler.core.request import ALL_STEMS, SeparationRequest, cli_options, parse_cli_request
from handler.errors import InvalidInput, WorkerError, as_worker_error

log = logging.getLogger("demucs-separate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="demucs-separate",
        description="Separate vocals and instrumental (or every stem) from an audio file or URL.",
    )
    p.add_argument("--input", "-i", required=True, help="audio file path or http(s) URL")
    p.add_argument("--output", "-o", required=True, type=Path, help="output directory")
    stems = p.add_mutually_exclusive_group()
    for name, flags, kwargs in cli_options():  # every separation option, from the request
        (stems if name == "stems" else p).add_argument(*flags, **kwargs)
    stems.add_argument("--all-stems", action="store_true", help="write every stem")
    p.add_argument("--progress-file", type=Path, default=None,
                   help="keep a progress JSON (predecessor format) at this path")
    p.add_argument("--endpoint", default=None,
                   help="run on a RunPod endpoint with this ID, or on a self-hosted server "
                   "at this base URL (http://host:port), instead of locally")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging, tracebacks")
    return p


def request_from_args(args: argparse.Namespace) -> SeparationRequest:
    """The request the command line asks for: options left out keep the request's defaults."""
    given = {name: getattr(args, name) for name, _, _ in cli_options()
             if getattr(args, name) is not None}
    if args.all_stems:
        given["stems"] = [ALL_STEMS]
    return parse_cli_request(given)


def main(argv: list[str] | None = None) -> int:
    with interruptible():  # SIGTERM too: cleanup runs, exit 143
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    progress_file = ProgressFile(args.progress_file) if args.progress_file else None
    try:
        req = request_from_args(args)
        if args.endpoint:
            from handler.adapters.remote import run_remote

            paths = run_remote(args.endpoint, args.input, args.output, req, quiet=args.quiet)
        else:
            paths = run_local(args.input, args.output, req, progress_file, quiet=args.quiet)
    except KeyboardInterrupt as e:  # Interrupted: SIGINT or SIGTERM
        name, code = (e.name, e.exit_code) if isinstance(e, Interrupted) else ("SIGINT", 130)
        if progress_file:
            progress_file.failed("interrupted")
        print(f"demucs-separate: interrupted by {name}; temporary files removed",
              file=sys.stderr)
        return code
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
