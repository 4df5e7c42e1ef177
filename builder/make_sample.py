"""Write the bundled sample jobs: ``test_input.json`` and ``.runpod/tests.json``.

Both carry a 4-second synthetic song (``devtools/songs.py``) as base64 with ``return_base64``, so
they run with no network, no bucket and no secrets (RunPod Hub tests, a fresh checkout).

    python builder/make_sample.py
"""

from __future__ import annotations

import base64
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sample_base64(seconds: float = 4.0) -> str:
    from devtools.songs import make_mixture
    from handler.core.encode import open_writer

    mix = make_mixture(seconds, seed=7)["mixture"]
    with tempfile.TemporaryDirectory() as tmp:
        writer = open_writer(Path(tmp) / "sample.mp3", "mp3", 44100, 2, 96)
        writer.write(mix)
        data = writer.close().path.read_bytes()
    return base64.b64encode(data).decode()


def main() -> int:
    job_input = {"audio_base64": sample_base64(), "return_base64": True}
    (ROOT / "test_input.json").write_text(json.dumps({"input": job_input}, indent=2) + "\n")
    tests = {
        "tests": [
            {"name": "instrumental_mp3_base64", "input": job_input, "timeout": 300000},
            {"name": "vocals_wav_stereo_base64",
             "input": {**job_input, "stems": ["vocals"], "output_format": "wav", "channels": 2},
             "timeout": 300000},
        ],
        "config": {
            "gpuTypeId": "NVIDIA GeForce RTX 4090",
            "gpuCount": 1,
            "env": [{"key": "DEFAULT_MODEL", "value": "htdemucs"}],
            "allowedCudaVersions": ["12.8", "12.9"],
        },
    }
    (ROOT / ".runpod" / "tests.json").write_text(json.dumps(tests, indent=2) + "\n")
    print("wrote test_input.json and .runpod/tests.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
