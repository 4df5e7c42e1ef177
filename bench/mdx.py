"""MDX-Net on the CPU: our whole job vs audio-separator 0.47.1's MDX separator, one run.

    python bench/mdx.py                    # ONNX Runtime options, then 180 s: ours vs theirs
    python bench/mdx.py --durations 180 1800 --no-theirs-long   # + 30-minute peak RSS (ours)
    python bench/mdx.py --quick            # 20 s smoke run

No real weights can be downloaded here. The model is a randomly initialised KUIELab
ConvTDF network (the MDX-Net architecture: 5 scales of TFC-TDF blocks, g=48, l=3, bn=8, as
UVR's "tdf_extra" nets) with Inst_HQ_4's exact I/O and STFT settings (n_fft 5120, dim_f 2560,
dim_t 256, compensate 1.019 — its entry in KNOWN_HASHES) and about its file size (59 MB);
speed and memory do not depend on the weights' values. Both sides run the same .onnx file
on the same float WAV (peak 1.0, so audio-separator's gain stages are no-ops: see
devtools/mdx.run_oracle) and each runs in a fresh process; peak RSS is its
``ru_maxrss``. Ours runs as the images run it (tcmalloc preloaded, the CLI writing 16-bit
WAV stems); theirs as its Python API with use_soundfile (float WAV stems).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
WORK = Path(os.environ.get("BENCH_DIR", "/tmp/mdx-bench"))
NAME = "bench_hq4"
HQ4 = "0f2a6bc5b49d87d64728ee40e23bceb1"


def hq4_data() -> dict:
    from handler.core.models.mdx_net import KNOWN_HASHES

    name, p = KNOWN_HASHES[HQ4]
    assert name == "UVR-MDX-NET-Inst_HQ_4"
    return {"compensate": p.compensate, "mdx_dim_f_set": p.dim_f, "mdx_dim_t_set": 8,
            "mdx_n_fft_scale_set": p.n_fft, "primary_stem": "Instrumental"}


def conv_tdf_net(dim_f: int, g: int = 48, scales: int = 5, layers: int = 3, bn: int = 8):
    """KUIELab's Conv-TDF net (mdx-net ``tfc_tdf_v1``, non-dense), random weights."""
    import torch
    from torch import nn

    class TFCTDF(nn.Module):
        def __init__(self, c: int, f: int):
            super().__init__()
            self.tfc = nn.Sequential(*[m for _ in range(layers) for m in (
                nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())])
            self.tdf = nn.Sequential(nn.Linear(f, f // bn, bias=False), nn.BatchNorm2d(c),
                                     nn.ReLU(), nn.Linear(f // bn, f, bias=False),
                                     nn.BatchNorm2d(c), nn.ReLU())

        def forward(self, x):
            x = self.tfc(x)
            return x + self.tdf(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Sequential(nn.Conv2d(4, g, 1), nn.BatchNorm2d(g), nn.ReLU())
            c, f = g, dim_f
            self.enc, self.down, self.up, self.dec = (nn.ModuleList() for _ in range(4))
            for _ in range(scales):
                self.enc.append(TFCTDF(c, f))
                self.down.append(nn.Sequential(nn.Conv2d(c, c + g, 2, stride=2),
                                               nn.BatchNorm2d(c + g), nn.ReLU()))
                c, f = c + g, f // 2
            self.mid = TFCTDF(c, f)
            for _ in range(scales):
                self.up.append(nn.Sequential(nn.ConvTranspose2d(c, c - g, 2, stride=2),
                                             nn.BatchNorm2d(c - g), nn.ReLU()))
                c, f = c - g, f * 2
                self.dec.append(TFCTDF(c, f))
            self.final = nn.Conv2d(c, 4, 1)

        def forward(self, x):
            x = self.first(x).transpose(-1, -2)  # (b, c, t, f): the TDF layers act on f
            skips = []
            for enc, down in zip(self.enc, self.down, strict=True):
                x = enc(x)
                skips.append(x)
                x = down(x)
            x = self.mid(x)
            for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
                x = dec(up(x) * skip)
            # scaled so the stems are O(0.1), as a trained model's (16-bit WAV resolves them)
            return self.final(x.transpose(-1, -2)) * 2000

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # BatchNorm running stats that keep activations O(1)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.fill_(4.0)
    return net


def export(models: Path) -> Path:
    from devtools.mdx import export_onnx

    data = hq4_data()
    path = models / f"{NAME}.onnx"
    if not path.exists():
        export_onnx(path, data["mdx_dim_f_set"], 256, 0, net=conv_tdf_net(data["mdx_dim_f_set"]))
        (models / f"{NAME}.json").write_text(json.dumps(data))
    return path


def write_wav(path: Path, seconds: float) -> None:
    import numpy as np
    import soundfile as sf

    from devtools.mdx import mix_signal

    if path.exists():
        return
    with sf.SoundFile(str(path), "w", 44100, 2, subtype="FLOAT") as f:
        peak_block = True
        for start in range(0, int(seconds), 60):  # a minute at a time; first block peaks at 1.0
            block = mix_signal(min(60, seconds - start), seed=start)
            if not peak_block:
                block *= 0.99 / max(1e-9, float(np.abs(block).max()))
            f.write(block.T)
            peak_block = False


# --- child processes ---------------------------------------------------------------------


def case_ours(wav: str, out: str) -> dict:
    os.environ["MODELS_DIR"] = str(WORK / "models")
    from handler.adapters.cli import main

    started = time.perf_counter()
    rc = main(["--input", wav, "--output", out, "--model", NAME, "--all-stems", "--format",
               "wav", "--channels", "2", "-q"])
    assert rc == 0
    return {"seconds": time.perf_counter() - started}


def case_theirs(wav: str, out: str) -> dict:
    import soundfile as sf

    from devtools.mdx import run_oracle

    started = time.perf_counter()
    stems = run_oracle(WORK / "models" / f"{NAME}.onnx", hq4_data(), Path(wav), Path(out))
    seconds = time.perf_counter() - started
    for stem, audio in stems.items():
        sf.write(Path(out) / f"{stem}.wav", audio.T, 44100, subtype="FLOAT")
    return {"seconds": seconds}


def case_tune(cfg: dict) -> dict:
    """Seconds per [batch, 4, 2560, 256] network call under one ONNX Runtime setting."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cfg["threads"]
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, cfg["opt"])
    opts.enable_cpu_mem_arena = cfg["arena"]
    providers = (["CUDAExecutionProvider", "CPUExecutionProvider"]
                 if os.environ.get("DEVICE") == "cuda" else ["CPUExecutionProvider"])
    sess = ort.InferenceSession(str(WORK / "models" / f"{NAME}.onnx"), opts, providers=providers)
    assert sess.get_providers()[0] == providers[0], sess.get_providers()
    x = np.random.default_rng(0).standard_normal((cfg["batch"], 4, 2560, 256), np.float32)
    sess.run(None, {"input": x})  # warm-up (arena, kernels)
    times = []
    for _ in range(cfg.get("reps", 2)):
        t = time.perf_counter()
        sess.run(None, {"input": x})
        times.append(time.perf_counter() - t)
    return {**cfg, "s_per_chunk": min(times) / cfg["batch"]}


def child_main(mode: str, args: dict) -> None:
    fn = {"ours": case_ours, "theirs": case_theirs, "tune": case_tune}[mode]
    out = fn(**args)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the parent.
    status = Path("/proc/self/status").read_text().splitlines()
    out["maxrss_mb"] = next(int(x.split()[1]) for x in status if x.startswith("VmHWM")) / 1024
    print(json.dumps(out))


def child(mode: str, **kw) -> dict:
    env = dict(os.environ)
    if mode == "ours" or kw.pop("tcmalloc_preload", False):
        from run import tcmalloc

        preload = tcmalloc()
        if preload:
            env.update(LD_PRELOAD=preload, TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=str(1 << 40))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", mode, json.dumps(kw)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - started
    out["allocator"] = "tcmalloc" if "LD_PRELOAD" in env else "glibc"
    return out


def cpu_info() -> dict:
    from handler.config import cpu_quota

    info = {"cpu_quota": cpu_quota(), "platform": platform.platform()}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and "model" not in info:
            info["model"] = line.split(":", 1)[1].strip()
        if line.startswith("flags") and "simd_flags" not in info:
            flags = line.split(":", 1)[1].split()
            info["simd_flags"] = [f for f in flags if f.startswith(("avx", "fma", "amx", "sse4"))]
    info["load_avg_start"] = os.getloadavg()
    return info


def snr(ref_path: Path, est_path: Path) -> float:
    import soundfile as sf

    from devtools.metrics import snr_db

    ref, _ = sf.read(ref_path, dtype="float64")
    est, _ = sf.read(est_path, dtype="float64")
    return snr_db(ref, est)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--durations", type=float, nargs="+", default=[180.0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--no-theirs-long", action="store_true",
                    help="run audio-separator only on the shortest duration")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: ours and the option sweep on ONNX Runtime's CUDA provider "
                         "(bench/gpu_mdx.sh); audio-separator then picks CUDA itself")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2],
                    help="batch sizes for the option sweep")
    args = ap.parse_args()
    os.environ["DEVICE"] = args.device
    durations = [20.0] if args.quick else args.durations
    (WORK / "models").mkdir(parents=True, exist_ok=True)
    export(WORK / "models")
    report: dict = {"cpu": cpu_info(), "model_bytes": (WORK / "models" / f"{NAME}.onnx")
                    .stat().st_size, "rows": []}
    print(f"CPU: {report['cpu']['model']}, quota {report['cpu']['cpu_quota']}, "
          f"{' '.join(report['cpu']['simd_flags'])}; model {report['model_bytes'] / 1e6:.1f} MB")

    if not args.no_tune:
        quota = report["cpu"]["cpu_quota"]
        base = [(quota, "ORT_ENABLE_ALL", True), (1, "ORT_ENABLE_ALL", True),
                (quota, "ORT_ENABLE_BASIC", True), (quota, "ORT_ENABLE_ALL", False)]
        configs = [dict(threads=t, opt=o, arena=a, batch=1) for t, o, a in base]
        configs += [dict(threads=quota, opt="ORT_ENABLE_ALL", arena=True, batch=b)
                    for b in args.batches if b > 1]
        rows = [child("tune", cfg=c) for c in configs]  # one process each: peak RSS per row
        # The arena's cost depends on the allocator under it: the images preload tcmalloc.
        arenas = [dict(threads=quota, opt="ORT_ENABLE_ALL", arena=a, batch=1)
                  for a in (True, False)]
        rows += [child("tune", tcmalloc_preload=True, cfg=c) for c in arenas]
        report["tune"] = rows
        print("ONNX Runtime options, one [b, 4, 2560, 256] call (s per chunk, peak RSS):")
        for r in rows:
            print(f"  threads={r['threads']} {r['opt']:<17} arena={r['arena']!s:<5} "
                  f"batch={r['batch']} {r['allocator']:<8}: "
                  f"{r['s_per_chunk']:.2f} s, {r['maxrss_mb']:.0f} MB")

    for i, seconds in enumerate(durations):
        wav = WORK / f"mix_{int(seconds)}.wav"
        write_wav(wav, seconds)
        ours_dir, theirs_dir = WORK / f"ours_{int(seconds)}", WORK / f"theirs_{int(seconds)}"
        ours = child("ours", wav=str(wav), out=str(ours_dir))
        row = {"seconds": seconds, "ours": ours}
        line = (f"{seconds:>6.0f} s input: ours {ours['seconds']:.1f} s "
                f"(RTF {ours['seconds'] / seconds:.2f}), peak RSS {ours['maxrss_mb']:.0f} MB")
        if i == 0 or not args.no_theirs_long:
            theirs_dir.mkdir(parents=True, exist_ok=True)
            theirs = child("theirs", wav=str(wav), out=str(theirs_dir))
            row["theirs"] = theirs
            row["snr_db"] = {s: snr(theirs_dir / f"{s}.wav", ours_dir / f"{s}.wav")
                             for s in ("vocals", "instrumental")}
            line += (f"; audio-separator {theirs['seconds']:.1f} s, peak RSS "
                     f"{theirs['maxrss_mb']:.0f} MB; speed ratio "
                     f"{theirs['seconds'] / ours['seconds']:.2f}x, RSS ratio "
                     f"{theirs['maxrss_mb'] / ours['maxrss_mb']:.2f}x; SNR ours vs theirs "
                     + ", ".join(f"{k} {v:.1f} dB" for k, v in row["snr_db"].items()))
        print(line, flush=True)
        report["rows"].append(row)
    if len(report["rows"]) > 1:
        a, b = report["rows"][0]["ours"], report["rows"][-1]["ours"]
        print(f"peak RSS {durations[-1]:.0f} s / {durations[0]:.0f} s: "
              f"{b['maxrss_mb'] / a['maxrss_mb']:.3f}")
    report["cpu"]["load_avg_end"] = os.getloadavg()
    report["date"] = time.strftime("%Y-%m-%d")
    out = ROOT / "bench" / "results" / ("mdx.json" if args.device == "cpu" else "mdx_cuda.json")
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2], json.loads(sys.argv[3]))
    else:
        main()
