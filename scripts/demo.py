"""The main job end to end, offline: local S3 → worker → instrumental MP3 in the bucket.

Started by ``scripts/demo.sh``. The job runs through ``python handler/handler.py --test_input``,
exactly as a RunPod user runs one locally.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=30.0, help="length of the generated song")
    p.add_argument("--out", type=Path, default=ROOT / "out")
    args = p.parse_args()

    import requests

    from devtools.servers import LocalS3Server
    from devtools.songs import make_mixture, write_audio

    with LocalS3Server() as server, tempfile.TemporaryDirectory() as tmp:
        s3 = server.client()
        s3.create_bucket(Bucket="demo")
        song = Path(tmp) / "song.mp3"
        write_audio(song, make_mixture(args.seconds, seed=1)["mixture"])
        s3.upload_file(str(song), "demo", "uploads/song.mp3")
        audio_url = s3.generate_presigned_url(
            "get_object", Params={"Bucket": "demo", "Key": "uploads/song.mp3"}, ExpiresIn=600)

        env = {
            **os.environ, **server.bucket_env("demo"),
            "ALLOW_PRIVATE_URLS": "true",  # the local S3 server is on loopback
        }
        job = {"input": {"audio_url": audio_url}}
        print(f"separating a {args.seconds:.0f} s generated song with the default model...",
              file=sys.stderr)
        proc = subprocess.run(
            [sys.executable, "handler/handler.py", "--test_input", json.dumps(job)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
        )
        result = json.loads(proc.stdout) if proc.stdout.strip() else {}
        if proc.returncode != 0 or "error" in result:
            print(f"demo failed: {result.get('error', proc.returncode)}", file=sys.stderr)
            return 1
        args.out.mkdir(parents=True, exist_ok=True)
        local = args.out / "instrumental.mp3"
        local.write_bytes(requests.get(result["audio_url"], timeout=30).content)
        first = result["outputs"][0]
        print(f"model: {result['model']}, timings: {result['timings_s']}")
        print(f"instrumental: s3://demo/{first['key']} ({first['duration_s']:.2f} s, "
              f"{first['channels']} channel, {first['bytes']} bytes)")
        print(f"presigned URL (valid while the demo's S3 server runs): {result['audio_url']}")
        print(f"local copy: {local}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
