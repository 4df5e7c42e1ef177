"""``demucs-separate``: the pipeline from the command line (local files, folders or URLs).

    demucs-separate --input song.mp3 --output out/            # out/instrumental.mp3
    demucs-separate --input https://... --output out/ --all-stems --format flac
    demucs-separate --input long.wav --output out/ --interval-cut 300,600   # 3 files per stem
    demucs-separate -i albums/ -i 'more/*.flac' -o out/ --jobs 2 --manifest out/manifest.jsonl
    demucs-separate --input-list urls.txt -o out/ --endpoint ENDPOINT_ID --concurrency 8

``--interval-cut`` keeps the predecessor's cut points but separates the track as one: the
output of each stem is split into one file per interval (``<stem>_000.mp3``, ...), with no
seam at a cut. ``--progress-file`` keeps the predecessor's progress JSON up to date.
Several inputs: ``batch`` plans them (names, clashes, shards, resume), this module runs them.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from handler.adapters import batch
from handler.adapters.batch import Item, Manifest, Outcome, Plan
from handler.adapters.interrupt import Interrupted, interruptible
from handler.adapters.progress_file import ProgressFile
from handler.core.pipeline import Prepared, prepare, separate_file
from handler.core.request import ALL_STEMS, SeparationRequest, cli_options, parse_cli_request
from handler.errors import Cancelled, InvalidInput, WorkerError, as_worker_error

log = logging.getLogger("demucs-separate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="demucs-separate",
        description="Separate vocals and instrumental (or every stem) from audio files, "
        "folders or URLs. `--list-models` shows the models and how to bake them.",
    )
    p.add_argument("--input", "-i", action="append", default=[],
                   help="audio file, folder (recursive, audio files only), glob, http(s) URL, "
                   "s3://bucket/key or s3://bucket/prefix/; repeat for several")
    p.add_argument("--input-list", type=Path, default=None, metavar="FILE",
                   help="a text file of inputs (paths/URLs), one per line")
    p.add_argument("--output", "-o", type=Path, default=None, help="output directory")
    p.add_argument("--filename", default=None, metavar="TEMPLATE",
                   help="output names under --output, with {track}, {trackext}, {stem}, {ext} "
                   f"(default: {batch.SINGLE_TEMPLATE} for one input, {batch.MANY_TEMPLATE} "
                   "for several)")
    stems = p.add_mutually_exclusive_group()
    for name, flags, kwargs in cli_options():  # every separation option, from the request
        (stems if name == "stems" else p).add_argument(*flags, **kwargs)
    stems.add_argument("--all-stems", action="store_true", help="write every stem")
    p.add_argument("--jobs", "-j", type=int, default=1,
                   help="files separated at once, one model in memory (default: 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo inputs whose outputs already exist (default: skip them)")
    p.add_argument("--manifest", type=Path, default=None, metavar="FILE",
                   help="append each input's outcome as a JSON line (e.g. out/manifest.jsonl)")
    p.add_argument("--shard", default=None, metavar="i/N",
                   help="run only shard i (0-based) of N of the inputs: every input lands in "
                   "exactly one shard")
    p.add_argument("--progress-file", type=Path, default=None,
                   help="keep a progress JSON (predecessor format) at this path (one input)")
    p.add_argument("--endpoint", default=None,
                   help="run on a RunPod endpoint with this ID, or on a self-hosted server "
                   "at this base URL (http://host:port), instead of locally")
    p.add_argument("--concurrency", type=int, default=4,
                   help="with --endpoint and several inputs: jobs in flight (default: 4)")
    p.add_argument("--list-models", action="store_true",
                   help="list the models, their stems, whether each is available here and "
                   "the command that bakes it; then exit")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.list_models:
        from handler.adapters.models_list import render

        print(render())
        return 0
    if not args.input and args.input_list is None:
        parser.error("give --input (repeatable) or --input-list")
    if args.output is None:
        parser.error("--output is required")
    progress_file = ProgressFile(args.progress_file) if args.progress_file else None
    try:
        req = request_from_args(args)
        _check_output(args.output)
        if progress_file:
            progress_file.task("cutting", "running")
        specs = list(args.input)
        if args.input_list is not None:
            specs += batch.read_input_list(args.input_list)
        items = batch.expand_inputs(specs)
        if args.shard:
            items = batch.shard(items, *batch.parse_shard(args.shard))
        single = (len(specs) == 1 and len(items) == 1 and not args.shard
                  and not args.manifest and not (args.endpoint and args.filename))
        if not single:
            if progress_file:
                raise InvalidInput("--progress-file follows one input; use --manifest for "
                                   "several")
            return run_batch(items, args, req)
        if args.endpoint:
            from handler.adapters.remote import run_remote

            paths = run_remote(args.endpoint, items[0].source, args.output, req,
                               quiet=args.quiet)
        else:
            # One input overwrites, as demucs does (a rerun with other options must not be
            # skipped); several inputs, or --manifest, resume.
            paths = run_local(items[0], args.output, req, progress_file, quiet=args.quiet,
                              template=args.filename)
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


def _check_output(out: Path) -> None:
    """Before any work: the output must be a folder (or not exist yet)."""
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"--output {out} exists and is not a directory")
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise InvalidInput(f"--output {out}: {parent} is not a directory")


def run_local(
    item: Item | str, out_dir: Path, req: SeparationRequest,
    progress_file: ProgressFile | None, *, quiet: bool = False, template: str | None = None,
    overwrite: bool = True,
) -> list[Path]:
    """One input, with a chunk progress bar and the predecessor's progress file."""
    from tqdm import tqdm

    if isinstance(item, str):
        item = batch.expand_inputs([item])[0]
    if progress_file:
        progress_file.task("models", "running")
    prepared = prepare(req)
    plan = batch.plan_outputs([item], out_dir, template, prepared.stems, req.output_format)
    if not overwrite:
        done = batch.completed_outputs(item, plan, req, Manifest(None))
        if done is not None:
            print("demucs-separate: outputs exist; skipped (--overwrite to redo)",
                  file=sys.stderr)
            return done
    bar = tqdm(total=0, unit="chunk", disable=quiet or not sys.stderr.isatty(), file=sys.stderr)

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

    try:
        written, warnings = separate_item(item, prepared, plan, progress=progress)
    finally:
        bar.close()
    for warning in warnings:
        print(f"demucs-separate: warning: {warning}", file=sys.stderr)
    if progress_file:
        progress_file.completed([str(p) for p in written])
    return written


def separate_item(
    item: Item, prepared: Prepared, plan: Plan, *, progress=None, should_stop=None,
) -> tuple[list[Path], list[str]]:
    """Fetch, separate and place one input's outputs; its temporary folder always goes."""
    tmp = Path(tempfile.mkdtemp(prefix="demucs-separate-"))
    try:
        path = fetch_input(item.source, tmp)
        result = separate_file(path, tmp / "out", prepared, progress=progress,
                               should_stop=should_stop)
        written = []
        for output in result.outputs:
            dest = plan.path(item, output.stem, output.interval)
            batch.place(output.file.path, dest)
            written.append(dest)
        return written, result.warnings
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_batch(items: list[Item], args: argparse.Namespace, req: SeparationRequest) -> int:
    """Several inputs: plan every output first (clashes refused), skip the finished ones,
    run the rest, print the summary table; exit 1 if any input failed."""
    from tqdm import tqdm

    if args.jobs < 1 or args.concurrency < 1:
        raise InvalidInput("--jobs and --concurrency must be at least 1")
    manifest = Manifest(args.manifest)
    if args.endpoint:
        prepared = None
        stems = batch.stems_for(req, None)
    else:
        prepared = prepare(req)  # one model for every file (and the stems it offers)
        stems = prepared.stems
    plan = batch.plan_outputs(items, args.output, args.filename, stems, req.output_format)
    outcomes: dict[str, Outcome] = {}
    todo = []
    for item in items:
        done = None if args.overwrite else batch.completed_outputs(item, plan, req, manifest)
        if done is not None:
            outcomes[item.source] = Outcome(item.source, "skipped", [str(p) for p in done])
        else:
            todo.append(item)
    bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="file",
               disable=args.quiet, file=sys.stderr)
    try:
        if args.endpoint:
            from handler.adapters.fanout import run_fanout

            results = run_fanout(args.endpoint, todo, plan, req, manifest, bar,
                                 concurrency=args.concurrency)
        else:
            assert prepared is not None
            results = _run_local_batch(todo, prepared, plan, manifest, bar, args.jobs)
    finally:
        bar.close()
    outcomes.update({o.source: o for o in results})
    ordered = [outcomes[it.source] for it in items if it.source in outcomes]
    print(batch.summary_table(ordered), file=sys.stderr)
    for o in ordered:
        for path in o.outputs:
            print(path)
    return 1 if any(o.status == "failed" for o in ordered) else 0


def _run_local_batch(items: list[Item], prepared: Prepared, plan: Plan, manifest: Manifest,
                     bar, jobs: int) -> list[Outcome]:
    """Up to ``jobs`` files at once in threads sharing the one loaded model. An interrupt
    stops every file at its next chunk (its temporary folder removed), then re-raises."""
    stop = threading.Event()

    def one(item: Item) -> Outcome:
        started = time.perf_counter()
        try:
            written, _ = separate_item(item, prepared, plan, should_stop=stop.is_set)
            return Outcome(item.source, "done", [str(p) for p in written],
                           seconds=time.perf_counter() - started)
        except Exception as exc:  # one file's failure never stops the others
            err = as_worker_error(exc)
            status = "cancelled" if isinstance(exc, Cancelled) else "failed"
            return Outcome(item.source, status, error=str(err),
                           seconds=time.perf_counter() - started)

    return batch.run_pool(
        items, one, jobs, manifest, bar, name="separate", on_interrupt=stop.set,
        line=lambda o: f"{o.status:>9} {o.seconds:6.1f} s  {o.source}")


def fetch_input(source: str, tmp: Path) -> Path:
    if source.startswith("s3://"):
        from handler import config
        from handler.transfer import keys, s3

        bucket, key = keys.parse_s3_uri(source)
        client = s3.make_client(s3.S3Settings.from_env())
        dest = tmp / ("input" + Path(key).suffix)
        s3.download_object(client, bucket, key, dest, max_bytes=config.max_download_bytes())
        return dest
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
