"""One benchmark case per process (called by bench/run.py): prints one JSON line.

    python bench/cases.py MODE '{"model": ..., ...}'
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SOURCES = ["drums", "bass", "other", "vocals"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_repo(repo: Path) -> Path:
    """Real-size random HTDemucs (as released: bottom_channels 512, segment 7.8 s) and a bag of
    four like htdemucs_ft, in demucs's local-repo format."""
    from demucs.htdemucs import HTDemucs

    from devtools.checkpoints import save_checkpoint, wake_layer_scales, write_bag

    sigs = []
    for i in range(4):
        import torch

        torch.manual_seed(i)
        net = HTDemucs(sources=SOURCES, bottom_channels=512, segment=Fraction(39, 5)).eval()
        wake_layer_scales(net, i)
        sig = f"{i}e{i}e{i}e{i}e"
        save_checkpoint(net, repo, sig)
        sigs.append(sig)
    write_bag(repo, "htdemucs", sigs[:1])
    write_bag(repo, "htdemucs_ft", sigs, weights=[[1.0 if j == i else 0.0 for j in range(4)]
                                                  for i in range(4)])
    return repo


def load_wav(path: str):
    import soundfile as sf
    import torch

    data, rate = sf.read(path, dtype="float32", always_2d=True)
    assert rate == 44100
    return torch.from_numpy(data.T.copy())


def demucs_cli(model: str, repo: str, input: str, out: str) -> dict:
    from demucs.separate import main

    started = time.perf_counter()
    main(["--repo", repo, "-n", model, "--mp3", "-o", out, input])
    return {"compute_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


def our_cli(model: str, input: str, out: str) -> dict:
    from handler.adapters.cli import main

    started = time.perf_counter()
    rc = main(["--input", input, "--output", out, "--model", model, "--all-stems",
               "--channels", "2", "--quiet"])
    assert rc == 0
    return {"compute_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


def apply_model(model: str, repo: str, input: str, save: str) -> dict:
    import numpy as np
    import torch
    from demucs import apply
    from demucs.pretrained import get_model

    torch.set_num_threads(torch.get_num_threads())
    net = get_model(model, repo=Path(repo))
    mix = load_wav(input)
    offsets: list[int] = []
    draw = apply.random.randint

    def recording(a: int, b: int) -> int:
        value = draw(a, b)
        offsets.append(value)
        return value

    apply.random.randint = recording  # the shift offsets, so our engine can use the same
    random.seed(0)
    started = time.perf_counter()
    out = apply.apply_model(net, mix[None], shifts=1, overlap=0.25)[0]
    compute = time.perf_counter() - started
    np.save(save, out.numpy())
    return {"compute_s": compute, "peak_rss_mb": peak_rss_mb(), "offsets": offsets}


def our_job(model: str, audio_url: str, bucket_env: dict) -> dict:
    import os

    os.environ.update(bucket_env)
    os.environ["MAX_DOWNLOAD_MB"] = "4096"
    from handler.core.models import get_model
    from handler.service.runner import run_job

    get_model(model)  # the worker loads its model at cold start, before taking jobs
    started = time.perf_counter()
    items = list(run_job({"id": f"bench-{model}", "input": {"audio_url": audio_url,
                                                            "model": model}}))
    job_s = time.perf_counter() - started
    final = items[-1]
    assert final.get("status") == "completed", final
    return {"job_s": job_s, "peak_rss_mb": peak_rss_mb(), "timings_s": final["timings_s"]}


def snr(model: str, input: str, ref: str, offsets: list[int]) -> dict:
    import numpy as np

    from devtools.metrics import snr_db
    from handler.core.engine import EngineOptions, separate_array
    from handler.core.models import get_model

    reference = np.load(ref)
    ours = separate_array(get_model(model), load_wav(input).numpy(),
                          EngineOptions(shifts=1, overlap=0.25, shift_offsets=offsets))
    per_stem = [snr_db(r, o) for r, o in zip(reference, ours, strict=True)]
    return {"snr_db": float(min(per_stem)), "per_stem_db": [float(s) for s in per_stem]}


if __name__ == "__main__":
    mode, kwargs = sys.argv[1], json.loads(sys.argv[2])
    result = globals()[mode](**kwargs)
    print(json.dumps(result))
