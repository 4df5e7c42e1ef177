"""The separation request: every option, its default and its bounds, written once.

The job schema (``handler.service.schema.JobInput``) extends it, the CLI's options are generated
from it (``cli_options``), and the remote client dumps it. Checks that need the loaded model
(stem names, a family's segment limit) are in ``Prepared``/``prepare`` in the pipeline.

One coercion rule for every numeric field: a JSON number or a string holding one (``2`` or
``"2"``); never a bool, never NaN or infinity.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from handler.core.encode import BIT_DEPTHS, FORMATS, MP3_BITRATES
from handler.errors import InvalidInput

ALL_STEMS = "all"
MAX_INTERVAL_CUTS = 100  # one output file per interval and stem: keep the final item small


def output_name(stem: str, interval: int | None) -> str:
    """File name (without extension) of one output: ``<stem>`` or ``<stem>_<NNN>``."""
    return stem if interval is None else f"{stem}_{interval:03d}"


def _cli(*flags: str, metavar: str | None = None, hint: str | None = None) -> dict[str, Any]:
    """Command-line flags of an option; ``hint`` replaces pydantic's wording in CLI errors."""
    return {"cli": list(flags), "metavar": metavar, "hint": hint}


class SeparationRequest(BaseModel):
    """The options every entry point shares, under demucs's names where demucs has one."""

    model_config = ConfigDict(
        extra="forbid", str_strip_whitespace=True, allow_inf_nan=False, protected_namespaces=()
    )

    model: str | None = Field(
        None, description="model name (default: $DEFAULT_MODEL)",
        json_schema_extra=_cli("--model", "-n"))
    stems: list[str] = Field(
        default_factory=lambda: ["instrumental"],
        description='comma-separated stems (instrumental, vocals, drums, ...) or "all"',
        json_schema_extra=_cli("--stems"))
    output_format: Literal[FORMATS] = Field(  # type: ignore[valid-type]
        "mp3", description="output format", json_schema_extra=_cli("--format"))
    bit_depth: Literal[BIT_DEPTHS] = Field(  # type: ignore[valid-type]
        "16", description="WAV/FLAC samples: 16, 24 (bit integer) or 32f (32-bit float WAV, "
        "not clipped: demucs's --float32)", json_schema_extra=_cli("--bit-depth"))
    mp3_bitrate: int = Field(192, description="MP3 bitrate, kbps",
                             json_schema_extra=_cli("--mp3-bitrate"))
    channels: int = Field(1, description="1 (mono) or 2 (stereo) output",
                          json_schema_extra=_cli("--channels"))
    shifts: Annotated[int, Field(ge=0, le=20)] | None = Field(
        None, description="demucs shift trick: predictions averaged over random offsets "
        "(0 = off; default: the model's, 1 for demucs, 0 for MSST models)",
        json_schema_extra=_cli("--shifts"))
    overlap: Annotated[float, Field(ge=0.0, le=0.95)] | None = Field(
        None, description="fraction of a chunk shared with the next (default: the model's)",
        json_schema_extra=_cli("--overlap"))
    num_overlap: Annotated[int, Field(ge=1, le=64)] | None = Field(
        None, description="MSST models: how many chunks cover each sample (default: the "
        "model's YAML); cost is linear in it", json_schema_extra=_cli("--num-overlap"))
    segment: Annotated[float, Field(gt=0.5, le=60.0)] | None = Field(
        None, description="chunk length in seconds (default: the model's)",
        json_schema_extra=_cli("--segment"))
    interval_cut: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=list, max_length=MAX_INTERVAL_CUTS,
        description='cut points in seconds, e.g. "300,600": one output file per interval',
        json_schema_extra=_cli("--interval-cut", hint="must be comma-separated seconds"))
    seed: int = Field(0, description="seed of the shift offsets", json_schema_extra=_cli("--seed"))

    @field_validator("bit_depth", mode="before")
    @classmethod
    def _depth_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _depth_fits_format(self) -> SeparationRequest:
        if self.bit_depth != "16" and self.output_format == "mp3":
            raise ValueError("bit_depth applies to wav and flac output (MP3 has no bit depth)")
        if self.bit_depth == "32f" and self.output_format != "wav":
            raise ValueError("32-bit float samples need wav output (FLAC has none)")
        return self

    @field_validator("stems", mode="before")
    @classmethod
    def _split_stems(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [s.strip() for s in value.split(",") if s.strip()]
        return value

    @field_validator("interval_cut", mode="before")
    @classmethod
    def _split_cuts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [s for s in re.split(r"[,;\s]+", value) if s]
        return value

    @field_validator("mp3_bitrate", "channels", "shifts", "seed", "overlap", "segment",
                     "interval_cut", "num_overlap", mode="before")
    @classmethod
    def _no_bools(cls, value: Any) -> Any:
        # pydantic reads true as 1; a flag where a number belongs is a caller's mistake.
        if isinstance(value, bool) or (isinstance(value, list) and
                                       any(isinstance(v, bool) for v in value)):
            raise ValueError("must be a number, not true/false")
        return value

    @field_validator("mp3_bitrate")
    @classmethod
    def _bitrate(cls, value: int) -> int:
        if value not in MP3_BITRATES:
            raise ValueError(f"must be one of {', '.join(map(str, MP3_BITRATES))}")
        return value

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: int) -> int:
        if value not in (1, 2):
            raise PydanticCustomError("literal_error", "Input should be 1 or 2")
        return value

    @property
    def all_stems(self) -> bool:
        return ALL_STEMS in self.stems

    def as_job_input(self) -> dict[str, Any]:
        """The request as ``job["input"]`` fields (what the remote client sends)."""
        return self.model_dump(exclude_none=True)

    @classmethod
    def request_of(cls, data: BaseModel) -> SeparationRequest:
        """The request part of a model that extends this one (the job input)."""
        return cls.model_validate(data.model_dump(include=set(cls.model_fields)))


def cli_options() -> list[tuple[str, list[str], dict[str, Any]]]:
    """(field, flags, argparse keyword arguments) for each request option. Values stay strings
    (default None = not given): the request model parses them, exactly as it parses a job."""
    options = []
    for name, field in SeparationRequest.model_fields.items():
        extra = field.json_schema_extra or {}
        assert isinstance(extra, dict)
        default = field.get_default(call_default_factory=True)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = field.description or ""
        if shown not in (None, "") and "default" not in help_text:
            help_text += f" (default: {shown})"
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        choices = getattr(field.annotation, "__args__", None)
        if name in ("output_format", "bit_depth") and choices:
            kwargs["choices"] = list(choices)
        if extra.get("metavar"):
            kwargs["metavar"] = extra["metavar"]
        options.append((name, list(extra["cli"]), kwargs))
    return options


def parse_request(data: dict[str, Any]) -> SeparationRequest:
    try:
        return SeparationRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(describe_validation(exc)) from None


def parse_cli_request(data: dict[str, Any]) -> SeparationRequest:
    """As ``parse_request``, with problems named by their command-line flags."""
    try:
        return SeparationRequest.model_validate(data)
    except ValidationError as exc:
        parts = []
        for err in exc.errors(include_url=False, include_input=False):
            field = SeparationRequest.model_fields.get(str(err["loc"][0])) if err["loc"] else None
            extra = field.json_schema_extra if field is not None else None
            if not err["loc"]:  # a rule across fields (bit depth vs format)
                parts.append(str(err["msg"]).removeprefix("Value error, "))
                continue
            if not isinstance(extra, dict):
                parts.append(describe_validation(exc))
                break
            flag = extra["cli"][0]
            parts.append(f"{flag} {extra['hint']}" if extra.get("hint")
                         else f"{flag}: {err['msg']}")
        raise InvalidInput("; ".join(dict.fromkeys(parts))) from None


def describe_validation(exc: ValidationError, secret_fields: tuple[str, ...] = ()) -> str:
    """One line per problem, never echoing values (they may be secrets or huge base64)."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or "input"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        if any(s in where for s in secret_fields) and err["type"] != "missing":
            msg = "invalid"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)
