"""Where a job's outputs go: the worker's bucket, the caller's presigned PUT URLs, or base64
in the final item. Each is checked before any work so a misconfiguration costs nothing."""

from __future__ import annotations

import base64
import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handler import config
from handler.core.pipeline import StemOutput
from handler.errors import InvalidInput, UploadFailed
from handler.redact import redact_url
from handler.service.schema import JobInput, S3Config
from handler.transfer import keys, netguard, s3
from handler.transfer.http import put_presigned


class Destination:
    """Where outputs go. ``check`` runs before any work so a misconfiguration costs nothing."""

    def check(self, n_outputs: int | None, names: list[str] | None = None) -> None:  # noqa: B027
        """Refuse outputs this destination cannot take (called before and after the work)."""

    def preflight(self) -> None:  # noqa: B027
        """Reach the destination before any download (network checks)."""

    def store(self, output: StemOutput, name: str) -> dict:
        raise NotImplementedError


class Bucket(Destination):
    def __init__(self, settings: s3.S3Settings, key_for: Callable[[str, str], str]):
        self.settings = settings
        self.key_for = key_for  # (file name without extension, extension) -> key
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            self._client = s3.make_client(self.settings)
        return self._client

    def preflight(self) -> None:
        assert self.settings.bucket is not None
        s3.check_bucket(self.client(), self.settings.bucket)

    def store(self, output: StemOutput, name: str) -> dict:
        key = self.key_for(name, output.file.format)
        assert self.settings.bucket is not None
        s3.upload_file(self.client(), output.file.path, self.settings.bucket, key,
                            output.file.content_type)
        url = s3.presign_get(self.client(), self.settings.bucket, key,
                                  self.settings.presign_expiry_s)
        return {"url": url, "key": key, "bucket": self.settings.bucket}


class PresignedPut(Destination):
    def __init__(self, urls: dict[str, str] | list[str]):
        self.urls = urls
        self._next = 0
        # Refuse a URL that could never be PUT to (scheme, metadata host, blocked IP literal)
        # before any work; put_presigned checks again, with DNS, when it connects.
        for url in urls.values() if isinstance(urls, dict) else urls:
            try:
                netguard.check_url(url, allow_private=config.allow_private_urls(),
                                   resolve_host=False)
            except InvalidInput as e:
                raise InvalidInput(f"output_urls: {e.message}") from None

    def check(self, n_outputs: int | None, names: list[str] | None = None) -> None:
        if isinstance(self.urls, list) and n_outputs is not None and len(self.urls) < n_outputs:
            raise InvalidInput(
                f"output_urls has {len(self.urls)} URL(s) for {n_outputs} output file(s)"
            )
        missing = [n for n in names or [] if isinstance(self.urls, dict) and n not in self.urls]
        if missing:
            raise InvalidInput(f"output_urls has no URL for output {', '.join(missing)}")

    def store(self, output: StemOutput, name: str) -> dict:
        if isinstance(self.urls, dict):
            # A stem's URL serves only an uncut output: interval files each need their own
            # (one shared URL would leave just the last interval).
            url = self.urls.get(name)
            if url is None and output.interval is None:
                url = self.urls.get(output.stem)
            if url is None:
                raise InvalidInput(f"output_urls has no URL for output {name!r}")
        else:
            url = self.urls[self._next]
            self._next += 1
        put_presigned(url, output.file.path, output.file.content_type)
        return {"url": redact_url(url), "key": None}


class Base64(Destination):
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0

    def store(self, output: StemOutput, name: str) -> dict:
        self.used += output.file.bytes
        if self.used > self.max_bytes:
            raise InvalidInput(
                f"the result is larger than the {self.max_bytes // 1024 // 1024} MB limit of "
                "return_base64; use output_urls or the worker's bucket"
            )
        data = base64.b64encode(output.file.path.read_bytes()).decode()
        return {"url": f"data:{output.file.content_type};base64,{data}", "key": None}


@dataclass(frozen=True)
class LocalResults:
    """Keep outputs in ``dir`` (the HTTP server's DATA_DIR), served at ``url_prefix/<name>``.

    Set as ``job["local_results"]`` by the HTTP server only: a JSON job (RunPod's) can never
    carry this type, so a caller cannot point the worker at its disk.
    """

    dir: Path
    url_prefix: str
    url_suffix: str = ""  # e.g. the server's "?sig=..." download signature
    file_urls: bool = False  # local runs: url = the file's own file:// URL


class LocalDir(Destination):
    def __init__(self, where: LocalResults):
        self.where = where

    def store(self, output: StemOutput, name: str) -> dict:
        self.where.dir.mkdir(parents=True, exist_ok=True)
        dest = self.where.dir / f"{name}.{output.file.format}"
        shutil.move(output.file.path, dest)  # a rerun of the same job id overwrites
        if self.where.file_urls:
            return {"url": dest.resolve().as_uri(), "key": None}
        url = f"{self.where.url_prefix}/{name}{self.where.url_suffix}"
        return {"url": url, "key": None}


def destination_for(inp: JobInput, s3_config: S3Config | None, job_id: str,
                    event: tuple[str, str] | None,
                    local: LocalResults | None = None) -> Destination:
    if inp.return_base64:
        return Base64(config.env_int("MAX_BASE64_OUTPUT_MB", 15) * 1024 * 1024)
    if inp.output_urls is not None:
        return PresignedPut(inp.output_urls)
    if s3_config is not None:
        settings = s3.S3Settings.from_s3_config(s3_config.model_dump())
    else:
        settings = s3.S3Settings.from_env()
    if event is not None:
        bucket, input_key = event
        settings = dataclasses.replace(settings, bucket=bucket)
        return Bucket(settings, lambda name, ext: keys.event_output_key(input_key, name, ext))
    if not settings.configured and s3_config is None and isinstance(local, LocalResults):
        return LocalDir(local)
    if not settings.configured:
        raise UploadFailed(
            "no output destination: the worker has no bucket configured (BUCKET_NAME / "
            "BUCKET_ENDPOINT_URL) and the job gave neither output_urls, s3Config nor "
            "return_base64"
        )
    return Bucket(settings, lambda name, ext: keys.output_key(
        settings.prefix, job_id, name, ext))
