"""The one request model: the CLI, the job schema and the remote client all go through it."""

from __future__ import annotations

import math

import pytest

from handler.adapters.cli import build_parser, request_from_args
from handler.core.request import (
    MAX_INTERVAL_CUTS,
    SeparationRequest,
    cli_options,
    output_name,
    parse_cli_request,
    parse_request,
)
from handler.errors import InvalidInput
from handler.service.schema import JobInput, parse_job_input

pytestmark = pytest.mark.unit

ARGVS = [
    [],
    ["--model", "htdemucs", "--stems", "vocals,drums", "--format", "flac", "--channels", "2"],
    ["--all-stems", "--shifts", "0", "--overlap", "0.5", "--segment", "7.5", "--seed", "9"],
    ["--format", "wav", "--bit-depth", "32f"],
    ["--format", "flac", "--bit-depth", "24", "--channels", "2"],
    ["--mp3-bitrate", "320", "--interval-cut", "1.5,30;60", "-n", "mdx_extra"],
]


def from_argv(argv: list[str]) -> SeparationRequest:
    return request_from_args(build_parser().parse_args(["-i", "x.wav", "-o", "out", *argv]))


@pytest.mark.parametrize("argv", ARGVS, ids=lambda a: " ".join(a) or "defaults")
def test_cli_to_request_to_job_input_to_request_is_the_identity(argv: list[str]) -> None:
    req = from_argv(argv)
    job = {"audio_url": "https://example.com/a.mp3", **req.as_job_input()}
    assert parse_job_input(job).request() == req
    assert JobInput.model_validate(job).request().model_dump() == req.model_dump()


def test_every_request_field_has_a_cli_option_and_a_job_field() -> None:
    fields = set(SeparationRequest.model_fields)
    assert {name for name, _, _ in cli_options()} == fields
    assert fields <= set(JobInput.model_fields)
    flags = [f for _, fl, _ in cli_options() for f in fl]
    assert len(flags) == len(set(flags))


def test_defaults_are_written_once() -> None:
    req = from_argv([])
    assert req == SeparationRequest()
    assert (req.stems, req.output_format, req.mp3_bitrate, req.channels, req.shifts) == (
        ["instrumental"], "mp3", 192, 1, None)  # shifts: the model's default
    assert parse_job_input({"audio_url": "https://e.com/a"}).request() == req


def test_help_shows_defaults() -> None:
    text = build_parser().format_help()
    for fragment in ("(default: 192)", "(default: 1)", "(default: mp3)", "(default: instrumental)",
                     "(default: 0)"):
        assert fragment in text, fragment


@pytest.mark.parametrize("field", ["shifts", "channels", "mp3_bitrate", "seed", "overlap",
                                   "segment"])
def test_one_coercion_rule_numbers_or_numeric_strings(field: str) -> None:
    value = {"shifts": 2, "channels": 2, "mp3_bitrate": 128, "seed": 3, "overlap": 0.5,
             "segment": 4.5}[field]
    assert getattr(parse_request({field: value}), field) == value
    assert getattr(parse_request({field: str(value)}), field) == value
    with pytest.raises(InvalidInput, match=field):
        parse_request({field: True})
    with pytest.raises(InvalidInput, match=field):
        parse_request({field: "many"})


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, 1e308 * 10])
def test_non_finite_numbers_are_refused(bad: float) -> None:
    for field in ("overlap", "segment"):
        with pytest.raises(InvalidInput, match=field):
            parse_request({field: bad})
    with pytest.raises(InvalidInput, match="interval_cut"):
        parse_request({"interval_cut": [1.0, bad]})


def test_cut_points_are_capped() -> None:
    assert len(parse_request({"interval_cut": list(range(1, MAX_INTERVAL_CUTS + 1))})
               .interval_cut) == MAX_INTERVAL_CUTS
    with pytest.raises(InvalidInput, match="interval_cut"):
        parse_request({"interval_cut": list(range(1, MAX_INTERVAL_CUTS + 2))})


def test_cli_errors_name_flags() -> None:
    with pytest.raises(InvalidInput, match="^INVALID_INPUT: --shifts: "):
        parse_cli_request({"shifts": "30"})
    with pytest.raises(InvalidInput,
                       match="^INVALID_INPUT: --interval-cut must be comma-separated seconds"):
        parse_cli_request({"interval_cut": "1,x"})


def test_output_names() -> None:
    assert output_name("vocals", None) == "vocals"
    assert output_name("vocals", 7) == "vocals_007"
