"""One job's flow: fetch → separate (decode and encode inside) → store.

``open_job`` parses and checks everything that can be checked before any download (input,
destination, model, stems), so a typo costs nothing; ``JobPlan.execute`` then does the work.
Progress goes through ``report(stage, done, total)``, which raises ``Cancelled`` once the job
is cancelled.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from handler import config
from handler.core.pipeline import Prepared, prepare, separate_file
from handler.core.progress import ProgressFn
from handler.errors import InvalidInput
from handler.service.destinations import Destination, destination_for
from handler.service.schema import JobInput, decode_base64_audio, parse_job_input, parse_s3_config
from handler.transfer import keys, s3
from handler.transfer.http import download


@dataclasses.dataclass(frozen=True)
class LocalInput:
    """The job's audio as a local file: ``job["local_input"]``, set by local runs only
    (``handler.py --input-file``). A JSON job can never carry this type, so a caller cannot
    make a deployed worker read its disk; no base64 size limit applies."""

    path: Path


@dataclasses.dataclass
class JobPlan:
    """A job checked at the door: what to fetch, how to separate, where to store."""

    inp: JobInput
    prepared: Prepared
    destination: Destination
    event: tuple[str, str] | None  # (bucket, key) of an S3-event-triggered job
    s3_source: tuple[str, str] | None  # (bucket, key) to read: the event's or s3_uri's
    local_input: LocalInput | None = None

    def execute(self, work: Path, report: ProgressFn,
                should_stop: Callable[[], bool] | None = None) -> dict:
        started = time.perf_counter()
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        report("download", 0, 0)  # total unknown until the response headers
        src = self._fetch(work / "input", report)
        timings["download"] = time.perf_counter() - t0

        report("decode", 0, 1)
        result = separate_file(src, work / "out", self.prepared, progress=report,
                               should_stop=should_stop)
        src.unlink(missing_ok=True)  # free the temp disk before uploading
        self.destination.check(len(result.outputs))

        t0 = time.perf_counter()
        outputs = []
        for i, output in enumerate(result.outputs):
            report("upload", i, len(result.outputs))
            stored = self.destination.store(output, output.file.path.stem)
            outputs.append({"stem": output.stem, **stored, **output.describe()})
            output.file.path.unlink(missing_ok=True)
        timings["upload"] = time.perf_counter() - t0
        timings.update({k: v for k, v in result.timings_s.items() if k != "download"})
        timings["total"] = time.perf_counter() - started

        final = {
            "status": "completed",
            "audio_url": outputs[0]["url"] if outputs else None,
            "outputs": outputs,
            "model": result.model,
            "input_duration_s": round(result.input_duration_s, 6),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
        }
        if result.warnings:
            final["warnings"] = result.warnings
        if self.event is not None:
            final["source"] = f"s3://{self.event[0]}/{self.event[1]}"
        return final

    def _fetch(self, src: Path, report: ProgressFn) -> Path:
        inp = self.inp
        max_bytes = config.max_download_bytes()
        if self.local_input is not None:
            shutil.copyfile(self.local_input.path, src)  # the job's folder owns its input
        elif inp.audio_url is not None:
            download(inp.audio_url, src, max_bytes=max_bytes,
                     allow_private=config.allow_private_urls(),
                     on_progress=lambda done, total: report("download", done, total or 0))
        elif inp.audio_base64 is not None:
            src.write_bytes(decode_base64_audio(
                inp.audio_base64, config.env_int("MAX_BASE64_INPUT_MB", 10) * 1024 * 1024))
        else:
            assert self.s3_source is not None
            bucket, key = self.s3_source
            client = s3.make_client(s3.S3Settings.from_env())
            s3.download_object(client, bucket, key, src, max_bytes=max_bytes)
        return src


def open_job(job: dict, job_id: str) -> JobPlan | dict:
    """The job's plan, or the final item of a job with nothing to do (an S3 event for the
    worker's own output). Raises a WorkerError for anything wrong with the job."""
    local = job.get("local_input")
    local_input = local if isinstance(local, LocalInput) else None
    inp = parse_job_input(job.get("input"), local_input=local_input is not None)
    s3_config = parse_s3_config(job.get("s3Config"))

    event = None
    if inp.is_s3_event:
        records = keys.parse_s3_event(inp.model_dump(exclude_none=True))
        objects = [f"s3://{b}/{k}" for b, k in records]
        if records and all(keys.is_folder_marker(k) for _, k in records):
            return {"status": "skipped", "reason": "the object is a folder marker",
                    "objects": objects}
        fresh = [r for r in records
                 if not keys.is_own_output(r[1]) and not keys.is_folder_marker(r[1])]
        if records and not fresh:  # our own upload triggered this: nothing to do
            return {"status": "skipped", "reason": "the object is this worker's own output",
                    "objects": objects}
        if not records:  # e.g. ObjectRemoved: nothing to separate
            return {"status": "skipped", "reason": "the event has no ObjectCreated record"}
        if len(fresh) != 1:
            raise InvalidInput("the S3 event must carry exactly one ObjectCreated record")
        event = fresh[0]

    s3_source = event or (keys.parse_s3_uri(inp.s3_uri) if inp.s3_uri is not None else None)
    destination = destination_for(inp, s3_config, job_id, event, job.get("local_results"))
    prepared = prepare(inp.request())
    if not inp.interval_cut:
        destination.check(len(prepared.stems), prepared.stems)
    destination.preflight()  # a bucket typo costs a request, not a separation
    return JobPlan(inp, prepared, destination, event, s3_source, local_input)

