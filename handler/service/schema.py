"""The job input schema (``job["input"]``), validated with pydantic; unknown keys are rejected.

RunPod's ``rp_validator`` skips constraints in common cases, so validation is ours.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, model_validator

from handler.core.request import SeparationRequest, describe_validation
from handler.errors import InvalidInput

S3_CONFIG_SECRETS = ("accessSecret", "accessId")  # never echoed, scrubbed when stored


class S3Config(BaseModel):
    """RunPod's per-request ``s3Config`` (job top level)."""

    model_config = ConfigDict(extra="ignore")
    accessId: str
    accessSecret: str
    bucketName: str | None = None
    endpointUrl: str | None = None
    region: str | None = None
    prefix: str | None = None  # our extension: key prefix (default BUCKET_PREFIX)


class JobInput(SeparationRequest):
    """``job["input"]``: the separation request plus where the audio comes from and where the
    outputs go."""

    # --- audio source: exactly one (an S3 event notification counts as one) ---
    audio_url: str | None = None
    audio_base64: str | None = None
    s3_uri: str | None = None
    Records: list[dict[str, Any]] | None = None  # S3 event notification (AWS and MinIO)
    EventName: str | None = None  # MinIO's event envelope
    Key: str | None = None

    # --- destination ---
    output_urls: dict[str, str] | list[str] | None = None  # caller's presigned PUT URLs
    return_base64: bool = False

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> JobInput:
        sources = [
            name for name in ("audio_url", "audio_base64", "s3_uri", "Records")
            if getattr(self, name) not in (None, "", [])
        ]
        if info.context and info.context.get("local_input"):
            sources.append("a local file (--input-file)")
        if len(sources) != 1:
            found = ", ".join(sources) if sources else "none"
            raise ValueError(
                "give exactly one audio source: audio_url, audio_base64, s3_uri or an S3 event "
                f"(found: {found})"
            )
        if self.audio_url is not None and not self.audio_url.lower().startswith(
            ("http://", "https://")
        ):
            raise ValueError("audio_url must be an http(s) URL (use s3_uri for s3:// objects)")
        destinations = sum([self.output_urls is not None, self.return_base64])
        if destinations > 1:
            raise ValueError("give at most one of output_urls and return_base64")
        return self

    def request(self) -> SeparationRequest:
        return SeparationRequest.request_of(self)

    @property
    def is_s3_event(self) -> bool:
        return bool(self.Records)


def parse_job_input(raw: Any, *, local_input: bool = False) -> JobInput:
    """``local_input``: a local run supplies the audio as a file (flow.LocalInput), which
    counts as the job's one source."""
    if not isinstance(raw, dict):
        raise InvalidInput("job input must be a JSON object")
    try:
        return JobInput.model_validate(raw, context={"local_input": local_input})
    except ValidationError as exc:
        raise InvalidInput(describe_validation(exc)) from None


def parse_s3_config(raw: Any) -> S3Config | None:
    if raw is None:
        return None
    try:
        return S3Config.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput("s3Config: " + describe_validation(exc, S3_CONFIG_SECRETS)) from None


def decode_base64_audio(text: str, max_bytes: int) -> bytes:
    """Accepts plain base64 or a data URI (``data:audio/mpeg;base64,...``)."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise InvalidInput("audio_base64: data URI must be base64-encoded")
    text = re.sub(r"\s+", "", text)
    if len(text) * 3 // 4 > max_bytes:
        raise InvalidInput(
            f"audio_base64 is larger than the {max_bytes // (1024 * 1024)} MB limit; "
            "upload the file and pass audio_url instead"
        )
    text = text.translate(str.maketrans("-_", "+/"))  # accept the URL-safe alphabet too
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("audio_base64 is not valid base64") from None
    if not data:
        raise InvalidInput("audio_base64 is empty")
    return data
