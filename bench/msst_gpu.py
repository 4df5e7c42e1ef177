"""GPU check of the MSST families (prepared; run it on a CUDA machine). One command:

    python bench/msst_gpu.py                      # BS-1297, Kim Mel, MDX23C InstVoc HQ layouts
    python bench/msst_gpu.py --families mel --minutes 4 --compile
    python bench/msst_gpu.py --device cpu --tiny  # smoke run of this script without a GPU

Full-size networks with random weights (speed does not depend on the values), as MODELS_DIR
pairs (.ckpt + .yaml) so that the whole job runs exactly as a worker runs it. Printed per family
and precision (fp32, bf16, fp16 autocast):
- one chunk's forward latency at batch 1 and at the batch ``fit_batch`` picks, peak GPU memory;
- SNR of the half-precision output against fp32 on the same chunk;
- a ``--minutes``-long track's whole ``separate_file`` (decode, separate, encode WAV) in
  seconds, with the model already loaded (target: Kim Mel under 10 s for 4 minutes on an
  H100-class GPU);
- with ``--compile``: regional ``torch.compile`` of the transformer blocks (RoFormers): compile
  seconds and the per-chunk latency after it.
Output: JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--families", default="mel,bs,mdx23c")
    p.add_argument("--precisions", default="fp32,bf16,fp16")
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--tiny", action="store_true", help="small networks (smoke run)")
    a = p.parse_args()
    warnings.simplefilter("ignore")

    import soundfile as sf
    import torch

    from devtools import msst as ms
    from handler.core.models import base, msst
    from handler.core.pipeline import SeparationRequest, separate_file

    device = torch.device(a.device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda}
    print(json.dumps(info), flush=True)
    configs = {"bs": ms.BS_1297, "mel": ms.KIM_MEL, "mdx23c": ms.MDX23C_INSTVOC}
    tmp = Path(tempfile.mkdtemp())
    track = tmp / "track.wav"
    sf.write(track, ms.stereo_noise(a.minutes * 60, seed=1).T, 44100, subtype="FLOAT")
    os.environ["MODELS_DIR"] = str(tmp)
    os.environ["DEVICE"] = a.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for family in a.families.split(","):
        cfg = configs[family]
        if a.tiny:
            cfg = ms.small(cfg, family, dim_t=cfg["inference"]["dim_t"],
                           num_overlap=cfg["inference"]["num_overlap"])
        ms.write_pair(tmp, family, cfg, seed=0)
        net, spec = msst.load_network(tmp / f"{family}.ckpt", tmp / f"{family}.yaml")
        net.to(device)
        x = torch.from_numpy(ms.stereo_noise(spec.chunk / 44100 + 0.1, seed=2))
        x = x[None, :, :spec.chunk].to(device)
        reference = None
        for precision in a.precisions.split(","):
            dtype = base.PRECISIONS[precision]
            model = msst.load_msst(family, device)
            model.precision = precision
            batch = msst.fit_batch(model, dtype) if device.type == "cuda" else 1
            row: dict = {"family": family, "precision": precision, "chunk_s": spec.chunk / 44100,
                         "batch": batch}
            for b in sorted({1, batch}):
                xb = x.expand(b, -1, -1).contiguous()
                ctx = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(
                    device.type, enabled=False)
                with torch.inference_mode(), ctx:
                    y = model.members[0].forward(xb)  # warm-up
                    sync()
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    t0 = time.perf_counter()
                    for _ in range(3):
                        y = model.members[0].forward(xb)
                    sync()
                row[f"chunk_latency_s_b{b}"] = (time.perf_counter() - t0) / 3
                row[f"audio_s_per_s_b{b}"] = b * spec.chunk / 44100 / row[f"chunk_latency_s_b{b}"]
                if device.type == "cuda":
                    row[f"peak_gib_b{b}"] = torch.cuda.max_memory_allocated(device) / 2**30
            y1 = y[:1].float().cpu().numpy()
            if reference is None:
                reference = y1
            row["snr_vs_fp32_db"] = round(ms.snr_db(reference, y1), 1)
            os.environ["PRECISION"] = precision
            from handler.core.models import get_model, unload_all

            unload_all()
            get_model(family)  # loaded (and batch-probed) before the clock starts
            req = SeparationRequest(model=family, stems=["instrumental"], output_format="wav",
                                    channels=2)
            sync()
            t0 = time.perf_counter()
            separate_file(track, tmp / f"out_{family}_{precision}", req)
            sync()
            row["whole_job_s"] = time.perf_counter() - t0
            row["track_min"] = a.minutes
            unload_all()
            if a.compile and family != "mdx23c":
                blocks = [t for layer in model.members[0].module.layers for t in layer]
                t0 = time.perf_counter()
                for t in blocks:
                    t.compile()
                ctx = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(
                    device.type, enabled=False)
                with torch.inference_mode(), ctx:
                    model.members[0].forward(x)
                    sync()
                    row["compile_s"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    for _ in range(3):
                        model.members[0].forward(x)
                    sync()
                row["compiled_chunk_latency_s_b1"] = (time.perf_counter() - t0) / 3
            print(json.dumps(row), flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
