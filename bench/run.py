"""Benchmarks: our pipeline vs demucs on the same model and inputs, in one run, interleaved.

    python bench/run.py                 # 60 s and 180 s, htdemucs (+ --ft for htdemucs_ft)
    python bench/run.py --hour          # adds the 60-minute peak-RSS run (long)
    python bench/run.py --quick         # 20 s only, for a smoke run

Real demucs weights cannot be downloaded here, so the demucs models are randomly initialised
at their real size (HTDemucs as released: 41.5 M parameters; htdemucs_ft = a bag of four),
written in demucs's checkpoint format and loaded by both sides through demucs's own code.
Speed and memory do not depend on the weights' values.

Each case runs in a fresh subprocess; peak RSS is that process's ``ru_maxrss``. Printed:
- CLI vs CLI: ``python -m demucs --mp3`` vs ``demucs-separate`` (time, peak RSS, ratios);
- whole worker job (local HTTP fetch → MP3 on local S3) vs ``apply_model`` alone with its
  defaults (shifts=1, overlap=0.25), and the SNR of our output against apply_model's;
- the fast tier's real-time factor (``spleeter_2stems`` whole job);
- with ``--hour``: our peak RSS on a 60-minute input vs the 3-minute one.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def tcmalloc() -> str | None:
    """The allocator the images preload (Dockerfile*: LD_PRELOAD), if this machine has it."""
    import glob

    found = sorted(glob.glob("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4"))
    return found[0] if found else None


OURS = ("our_job", "our_cli")  # run as the images run them: with tcmalloc preloaded


def child(mode: str, **kw) -> dict:
    """Run ``bench/cases.py MODE`` in a fresh process; returns its JSON (+ wall time)."""
    args = [sys.executable, str(ROOT / "bench" / "cases.py"), mode, json.dumps(kw)]
    env = {**os.environ}
    preload = tcmalloc() if mode in OURS and not env.get("BENCH_GLIBC_MALLOC") else None
    if preload:
        env["LD_PRELOAD"] = preload
        env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] = str(1 << 40)
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    trace: list[list[float]] = []  # [seconds, RSS MB] every 10 s: where a peak came from

    def sample() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                kb = next(int(line.split()[1]) for line in status.read_text().splitlines()
                          if line.startswith("VmRSS:"))
            except (OSError, StopIteration, ValueError):
                break
            trace.append([round(time.perf_counter() - started), round(kb / 1024)])
            time.sleep(10)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{stderr[-3000:]}")
    out = json.loads(stdout.strip().splitlines()[-1])
    out["process_s"] = wall
    out["allocator"] = "tcmalloc" if "LD_PRELOAD" in env else "glibc"
    out["rss_trace_mb"] = trace
    return out


def write_input(path: Path, seconds: float, seed: int = 3) -> None:
    """A generated song at 44.1 kHz stereo: WAV (decoding costs the same on both sides), or
    MP3 for a ``.mp3`` path (the hour input: 86 MB instead of 635 MB)."""
    import numpy as np
    import soundfile as sf

    from devtools.songs import make_mixture
    from handler.core.encode import open_writer

    block = 60.0
    if path.suffix == ".mp3":
        writer = open_writer(path, "mp3", 44100, 2, 192)
        write, close = writer.write, writer.close
    else:
        f = sf.SoundFile(str(path), "w", 44100, 2, subtype="PCM_16")
        write, close = (lambda part: f.write(np.ascontiguousarray(part.T))), f.close
    done = 0.0
    while done < seconds:  # built a minute at a time: flat memory for the hour input
        write(make_mixture(min(block, seconds - done), seed=seed + int(done))["mixture"])
        done += block
    close()


@contextlib.contextmanager
def servers(root: Path):
    """A local HTTP server for the inputs and a local S3 server (moto) for the outputs, both on
    127.0.0.1 in this (parent) process, so they do not count in the cases' peak RSS."""
    import functools
    import threading

    from devtools.servers import LocalS3Server

    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with LocalS3Server() as s3:
            env = {**s3.bucket_env(s3.create_bucket("bench")), "ALLOW_PRIVATE_URLS": "true"}
            yield {"http": f"http://127.0.0.1:{httpd.server_address[1]}", "env": env}
    finally:
        httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def fmt_row(cells: list, widths: list[int]) -> str:
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--durations", default="60,180")
    p.add_argument("--ft", action="store_true", help="also htdemucs_ft (a bag of 4: slow)")
    p.add_argument("--models", default=None,
                   help="comma-separated models to compare (default: htdemucs, + --ft)")
    p.add_argument("--no-fast", action="store_true", help="skip the fast tier")
    p.add_argument("--hour", action="store_true", help="60-minute peak-RSS run (long)")
    p.add_argument("--hour-model", default="htdemucs",
                   help="model of the 60-minute run (htdemucs: ~0.8 s per audio second here)")
    p.add_argument("--no-compare", action="store_true",
                   help="skip the demucs comparisons (fast tier and --hour only)")
    p.add_argument("--quick", action="store_true", help="20 s only")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    durations = [20.0] if args.quick else [float(d) for d in args.durations.split(",")]
    models = ["htdemucs"] + (["htdemucs_ft"] if args.ft else [])
    if args.models:
        models = args.models.split(",")

    from cases import build_repo

    results: dict = {"cli": [], "job": [], "fast": [], "hour": None}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp_s, servers(Path(tmp_s)) as srv:
        tmp = Path(tmp_s)

        def job(model: str, path: Path) -> dict:
            return child("our_job", model=model, audio_url=f"{srv['http']}/{path.name}",
                         bucket_env=srv["env"])

        repo = build_repo(tmp / "models")
        env_models = {"MODELS_DIR": str(repo)}
        os.environ.update(env_models)
        inputs = {}
        for d in durations:
            inputs[d] = tmp / f"song_{int(d)}s.wav"
            write_input(inputs[d], d)

        for model in [] if args.no_compare else models:
            for d in durations:
                # Interleaved: reference and ours back to back on the same input.
                ref_cli = child("demucs_cli", model=model, repo=str(repo), input=str(inputs[d]),
                                out=str(tmp / "ref"))
                our_cli = child("our_cli", model=model, input=str(inputs[d]), out=str(tmp / "our"))
                results["cli"].append({"model": model, "seconds": d, "demucs": ref_cli,
                                       "ours": our_cli})
                print(json.dumps({"cli": results["cli"][-1]}), flush=True)
                ref = child("apply_model", model=model, repo=str(repo), input=str(inputs[d]),
                            save=str(tmp / f"ref_{model}_{int(d)}.npy"))
                ours = job(model, inputs[d])
                snr = child("snr", model=model, input=str(inputs[d]),
                            ref=str(tmp / f"ref_{model}_{int(d)}.npy"), offsets=ref["offsets"])
                results["job"].append({"model": model, "seconds": d, "apply_model": ref,
                                       "ours": ours, "snr_db": snr["snr_db"]})
                print(json.dumps({"job": results["job"][-1]}), flush=True)

        d = max(durations)
        if not args.no_fast:
            results["fast"].append({"seconds": d, "ours": job("spleeter_2stems", inputs[d])})
            print(json.dumps({"fast": results["fast"][-1]}), flush=True)
        if args.hour:
            hour = tmp / "song_3600s.mp3"
            write_input(hour, 3600.0)
            three = tmp / "song_180s.mp3"
            write_input(three, 180.0)
            results["hour"] = {"model": args.hour_model, "3min": job(args.hour_model, three)}
            print(json.dumps({"hour_3min": results["hour"]["3min"]}), flush=True)
            results["hour"]["60min"] = job(args.hour_model, hour)
            hour.unlink()

    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def report(r: dict) -> None:
    print("\nCLI vs CLI (python -m demucs --mp3 vs demucs-separate; same model, same WAV input)")
    w = [12, 6, 10, 10, 8, 12, 12, 8]
    print(fmt_row(["model", "sec", "demucs s", "ours s", "speedup", "demucs MB", "ours MB",
                   "mem x"], w))
    for row in r["cli"]:
        a, b = row["demucs"], row["ours"]
        print(fmt_row([row["model"], int(row["seconds"]), f"{a['process_s']:.1f}",
                       f"{b['process_s']:.1f}", f"{a['process_s'] / b['process_s']:.2f}x",
                       f"{a['peak_rss_mb']:.0f}", f"{b['peak_rss_mb']:.0f}",
                       f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x"], w))
    print("\nWhole job (HTTP fetch -> mono MP3 on local S3) vs apply_model alone "
          "(shifts=1, overlap=0.25)")
    if r["job"]:
        print(f"(ours on {r['job'][0]['ours'].get('allocator')}, as the images run it; "
              "apply_model on glibc malloc)")
    w = [12, 6, 12, 9, 8, 8, 10, 10, 9]
    print(fmt_row(["model", "sec", "apply_model", "ours s", "s/s", "speedup", "apply MB",
                   "ours MB", "SNR dB"], w))
    for row in r["job"]:
        a, b = row["apply_model"], row["ours"]
        print(fmt_row([row["model"], int(row["seconds"]), f"{a['compute_s']:.1f}",
                       f"{b['job_s']:.1f}", f"{b['job_s'] / row['seconds']:.3f}",
                       f"{a['compute_s'] / b['job_s']:.2f}x", f"{a['peak_rss_mb']:.0f}",
                       f"{b['peak_rss_mb']:.0f}", f"{row['snr_db']:.1f}"], w))
    for row in r["fast"]:
        b = row["ours"]
        print(f"\nFast tier spleeter_2stems, {int(row['seconds'])} s whole job: {b['job_s']:.2f} s "
              f"= {b['job_s'] / row['seconds']:.4f} s per audio second (RTF), "
              f"peak RSS {b['peak_rss_mb']:.0f} MB")
    if r["hour"]:
        a, b = r["hour"]["3min"], r["hour"]["60min"]
        print(f"\n60-minute input, {r['hour']['model']}: "
              f"peak RSS {b['peak_rss_mb']:.0f} MB vs 3-minute "
              f"{a['peak_rss_mb']:.0f} MB (ratio {b['peak_rss_mb'] / a['peak_rss_mb']:.3f}); "
              f"job {b['job_s']:.0f} s")
        trace = b.get("rss_trace_mb") or []
        if trace:  # RSS through the hour, by tenths of the run
            marks = [trace[min(len(trace) - 1, i * len(trace) // 10)] for i in range(10)]
            print("RSS over the run: " + ", ".join(f"{t // 60:.0f} min {mb} MB"
                                                   for t, mb in marks + [trace[-1]]))


if __name__ == "__main__":
    sys.exit(main())
