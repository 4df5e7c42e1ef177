"""Command line of the HTTP service: ``python -m handler.server [--host H] [--port P]``.

``--probe`` is the images' HEALTHCHECK: exit 0 when /ping answers 200, and always 0 outside
``MODE_TO_RUN=http`` (no server runs there). It imports nothing heavy."""

from __future__ import annotations

import argparse
import os
import urllib.request


def _probe(port: int) -> int:
    if os.environ.get("MODE_TO_RUN", "serverless").strip().lower() != "http":
        return 0
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except OSError:
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handler.server",
                                     description="The self-hosted HTTP service.")
    parser.add_argument("--host", help="bind address (default $HOST or 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (default $PORT or 8000)")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        return _probe(args.port or int(os.environ.get("PORT", "").strip() or 8000))
    from handler.adapters.http.serve import serve

    return serve(args.host, args.port)
