"""MSST families at full size (random weights): ours vs audio-separator 0.47.1, in one run.

    python bench/msst.py                         # BS-1297, Kim Mel, MDX23C InstVoc HQ layouts
    python bench/msst.py --families mel --seconds 6 --chunk-seconds 2 --num-overlap 2
    python bench/msst.py --rss                   # + peak RSS of our streamed job, 3 vs 30 min
                                                 #   (tiny weights, real band layout: the engine)

Printed per family:
- TFLOP per audio second per pass (``torch.utils.flop_counter`` on the network between STFT and
  iSTFT, at the YAML's chunk; STFTs are a rounding error) and passes with the YAML's overlap;
- CPU seconds (user + system of the process) per audio second: our engine (streamed, as a job
  runs it) vs ``MDXCSeparator.demix`` on the same weights and input, each in a fresh process,
  with the ratio, both processes' peak RSS, and the SNR of our output against theirs.

The speed rows default to short chunks (``--chunk-seconds``) and few overlaps so that a
full-size RoFormer finishes on 2 cores; cost per pass is linear in audio length apart from the
time-attention term. Weights are random (``devtools/msst.random_state``, seeded, the same
in both processes): speed does not depend on their values. Run it alone:
``flock /tmp/heavy.lock python bench/msst.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

SR = 44100


def configs() -> dict[str, dict]:
    from devtools import msst as ms

    return {"bs": ms.BS_1297, "mel": ms.KIM_MEL, "mdx23c": ms.MDX23C_INSTVOC}


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
                break
    except OSError:
        pass
    import torch

    info["torch"] = torch.__version__
    info["threads"] = torch.get_num_threads()
    return info


def bench_config(family: str, chunk_seconds: float | None, num_overlap: int | None) -> dict:
    from handler.core.models import msst

    cfg = copy.deepcopy(configs()[family])
    spec = msst.spec_of(cfg, msst.architecture(cfg))
    if chunk_seconds:
        frames = round(chunk_seconds * SR / spec.hop) + 1
        if spec.time_multiple > 1:
            frames = max(1, round(frames / spec.time_multiple)) * spec.time_multiple
        cfg["inference"]["dim_t"] = frames
    if num_overlap:
        cfg["inference"]["num_overlap"] = num_overlap
    return cfg


def flops(family: str) -> dict:
    """TFLOP per audio second per pass at the published chunk, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from handler.core.models import msst

    cfg = configs()[family]
    arch = msst.architecture(cfg)
    spec = msst.spec_of(cfg, arch)
    frames = spec.chunk // spec.hop + 1
    with torch.device("meta"):
        net = msst.build_network(cfg, arch, 1 if spec.target else len(spec.sources)).eval()
        if arch == "mdx23c":
            x = torch.zeros(1, net.channels * 2, net.dim_f, frames)
        elif arch == "bs_roformer":
            x = torch.zeros(1, frames, net.num_freqs * net.audio_channels * 2)
        else:
            x = torch.zeros(1, frames, net.freq_indices.numel() * 2)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net.core(x)
    per_pass = counter.get_total_flops() / 1e12 / (spec.chunk / SR)
    params = sum(p.numel() for p in net.parameters())
    return {"tflop_per_s_pass": per_pass, "params_m": params / 1e6, "chunk_s": spec.chunk / SR,
            "num_overlap": spec.num_overlap}


# -- children ---------------------------------------------------------------------------------
def _child(mode: str, family: str, cfg: dict, seconds: float, out: str, seed: int) -> dict:
    import numpy as np
    import torch

    from devtools import msst as ms
    from handler.core.models import msst

    warnings.simplefilter("ignore")
    for key in ("freqs_per_bands", "multi_stft_resolutions_window_sizes"):  # JSON made lists
        if key in cfg["model"]:
            cfg["model"][key] = tuple(cfg["model"][key])
    root = Path(out).parent
    mix = ms.stereo_noise(seconds, seed=seed)
    if mode == "ours":
        arch = msst.architecture(cfg)
        spec = msst.spec_of(cfg, arch)
        net = msst.build_network(cfg, arch, 1 if spec.target else len(spec.sources))
        net.load_state_dict(ms.random_state(net, seed))
        net.eval().requires_grad_(False)
        from handler.core.engine import EngineOptions, separate_array
        from handler.core.models.base import LoadedModel

        model = LoadedModel(family, list(spec.sources), spec.samplerate, spec.audio_channels,
                            [msst.member_for(net, spec)])
        t0, c0 = time.perf_counter(), time.process_time()
        out_arr = separate_array(model, mix, EngineOptions(shifts=0))
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        result = dict(zip(model.sources, out_arr, strict=True))
    else:
        ms._oracle_package()
        net = ms.oracle_meta_network(cfg)  # built on the CPU here (no meta context)
        net.load_state_dict(ms.random_state(net, seed))
        net.eval()
        ms.write_config(root / "cfg.yaml", cfg)
        torch.save(net.state_dict(), root / "ref.ckpt")
        del net
        t0, c0 = time.perf_counter(), time.process_time()
        result = ms.oracle_demix(root / "ref.ckpt", root / "cfg.yaml", mix)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    np.savez(out, **result)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"cpu_s": cpu, "wall_s": wall, "peak_rss_mb": rss, "seconds": seconds}


def _rss_child(seconds: float) -> dict:
    """Peak RSS of our streamed engine on a long input (tiny Mel, Kim's 60-band layout)."""
    import numpy as np
    import torch

    from devtools import msst as ms
    from handler.core.engine import EngineOptions, Separator
    from handler.core.models import msst
    from handler.core.models.base import LoadedModel

    warnings.simplefilter("ignore")
    cfg = ms.small(configs()["mel"], "mel", dim_t=1101, num_overlap=1)
    arch = msst.architecture(cfg)
    spec = msst.spec_of(cfg, arch)
    net = msst.build_network(cfg, arch, 1)
    net.load_state_dict(ms.random_state(net, 0))
    net.eval()
    model = LoadedModel("mel", spec.sources, SR, 2, [msst.member_for(net, spec)])
    rng = np.random.default_rng(0)

    def blocks():
        for _ in range(int(seconds * 4)):
            yield (0.1 * rng.standard_normal((2, SR // 4))).astype(np.float32)

    with torch.inference_mode():
        for _ in Separator(model, EngineOptions(shifts=0)).run(blocks()):
            pass
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(*args) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--families", default="bs,mel,mdx23c")
    p.add_argument("--seconds", type=float, default=6.0, help="input length for the speed rows")
    p.add_argument("--chunk-seconds", type=float, default=2.0,
                   help="chunk for the speed rows (0: the YAML's)")
    p.add_argument("--num-overlap", type=int, default=2, help="0: the YAML's")
    p.add_argument("--rss", action="store_true")
    p.add_argument("--child")
    a = p.parse_args()
    if a.child:
        args = json.loads(a.child)
        res = _rss_child(*args[1:]) if args[0] == "rss" else _child(*args)
        print(json.dumps(res))
        return 0
    import numpy as np

    from devtools import msst as ms

    print(json.dumps({"cpu": cpu_info()}))
    for family in a.families.split(","):
        row: dict = {"family": family, **flops(family)}
        cfg = bench_config(family, a.chunk_seconds or None, a.num_overlap or None)
        with tempfile.TemporaryDirectory() as tmp:
            ours = run_child("ours", family, cfg, a.seconds, f"{tmp}/ours.npz", 1)
            ref = run_child("ref", family, cfg, a.seconds, f"{tmp}/ref.npz", 1)
            o, r = np.load(f"{tmp}/ours.npz"), np.load(f"{tmp}/ref.npz")
            row["snr_db"] = {k: round(ms.snr_db(r[k], o[k]), 1) for k in r.files}
        row.update(
            bench_dim_t=cfg["inference"]["dim_t"],
            bench_num_overlap=cfg["inference"]["num_overlap"],
            ours_cpu_s_per_s=ours["cpu_s"] / a.seconds, ref_cpu_s_per_s=ref["cpu_s"] / a.seconds,
            speedup=ref["cpu_s"] / ours["cpu_s"], ours_wall_s=ours["wall_s"],
            ref_wall_s=ref["wall_s"], ours_peak_rss_mb=ours["peak_rss_mb"],
            ref_peak_rss_mb=ref["peak_rss_mb"],
        )
        print(json.dumps(row), flush=True)
    if a.rss:
        short, long = run_child("rss", 180.0), run_child("rss", 1800.0)
        print(json.dumps({"rss_3min_mb": short["peak_rss_mb"], "rss_30min_mb": long["peak_rss_mb"],
                          "ratio": long["peak_rss_mb"] / short["peak_rss_mb"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
