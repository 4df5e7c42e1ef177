"""Faults around a job: storage down, connections reset mid-transfer, a full temp disk, a
job cancelled mid-separation, an interrupted multipart upload, a retried job.

Everything is real: the local HTTP server resets connections with RST, moto's S3 server sits
behind a TCP proxy that cuts big request bodies, the temp disk is a real 512 KiB tmpfs, the
model is spleeter_2stems. Each fault ends with the typed error (or the retried success), an
empty WORK_DIR, and a good job in the same process.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from worker_helpers import (
    assert_clean,
    b64,
    check_audio,
    check_error,
    check_final,
    decode,
    fetch,
    free_port,
    fresh_work_dir,
    input_bytes,
    run_good_job,
    run_in_process,
)

from devtools.servers import AcceptPut, Reset, Serve, Status
from devtools.servers import bucket_env as bucket_env_of
from handler.errors import UploadFailed
from handler.transfer import s3

MB = 1024 * 1024


@pytest.fixture(autouse=True)
def work_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fast_local_network: None) -> Path:
    return fresh_work_dir(monkeypatch, tmp_path, "DEFAULT_MODEL", "MAX_DURATION_S", "MODELS_DIR",
                          "PROGRESS_INTERVAL_S", "S3_MAX_ATTEMPTS", keep_bucket=False)


@pytest.fixture(scope="module", autouse=True)
def model_loaded() -> None:
    """Load the model first, so the time bounds below measure the faults, not the load."""
    from handler.core.models import get_model

    get_model("spleeter_2stems")


@pytest.fixture(scope="module")
def clip() -> tuple[bytes, int]:
    return input_bytes(1.0)


def bucket_env(monkeypatch: pytest.MonkeyPatch, endpoint: str, bucket: str) -> None:
    for name, value in bucket_env_of(endpoint, bucket).items():
        monkeypatch.setenv(name, value)


# --- storage down -------------------------------------------------------------------------


def test_s3_endpoint_down(monkeypatch, work_dir, clip):
    bucket_env(monkeypatch, f"http://127.0.0.1:{free_port()}", "out")  # nothing listens
    monkeypatch.setenv("S3_MAX_ATTEMPTS", "2")
    started = time.monotonic()

    run = run_in_process({"id": "down", "input": {"audio_base64": b64(clip[0])}})

    check_error(run, "UPLOAD_FAILED")
    assert run.final["error"] == (
        "UPLOAD_FAILED: could not reach the output bucket 'out': "
        "could not connect to the storage endpoint")
    assert run.progress == []  # found before any work
    assert time.monotonic() - started < 15
    assert_clean(work_dir)
    for name in [n for n in os.environ if n.startswith("BUCKET_")]:
        monkeypatch.delenv(name)
    run_good_job(work_dir, clip)


def test_s3_server_errors_are_retried_s3_max_attempts_times(monkeypatch, http_server,
                                                            work_dir, clip):
    key_path = "/out/separations/flaky/instrumental.mp3"
    http_server.route(key_path, Status(500))
    http_server.route("/out", Status(200))  # the bucket is there (HEAD before the work)
    bucket_env(monkeypatch, http_server.base_url, "out")
    monkeypatch.setenv("S3_MAX_ATTEMPTS", "3")

    run = run_in_process({"id": "flaky", "input": {"audio_base64": b64(clip[0])}})

    check_error(run, "UPLOAD_FAILED")
    assert "could not upload s3://out/separations/flaky/instrumental.mp3" in run.final["error"]
    assert "HTTP 500" in run.final["error"]
    assert http_server.hits(key_path) == 3  # S3_MAX_ATTEMPTS, first attempt included
    assert_clean(work_dir)


# --- connection resets --------------------------------------------------------------------


def test_presigned_put_reset_once_is_retried(http_server, work_dir, clip):
    data, samples = clip
    url = http_server.route("/out/instrumental.mp3", Reset(b"", after_bytes=4096), AcceptPut())

    run = run_in_process({"id": "put-reset", "input": {
        "audio_base64": b64(data), "output_urls": [url + "?X-Amz-Signature=feedface"]}})

    check_final(run.final, n_outputs=1)
    assert http_server.hits("/out/instrumental.mp3") == 2
    body = http_server.uploads["/out/instrumental.mp3"].body
    got = decode(body)
    assert got.samples == samples and got.codec.startswith("mp3")
    assert run.final["outputs"][0]["bytes"] == len(body)
    assert run.final["audio_url"] == url  # the caller's signature isn't echoed back
    assert_clean(work_dir)


def test_presigned_put_reset_always_fails(http_server, work_dir, clip):
    url = http_server.route("/out/instrumental.mp3", Reset(b"", after_bytes=4096))

    run = run_in_process({"id": "put-reset", "input": {
        "audio_base64": b64(clip[0]), "output_urls": [url + "?X-Amz-Signature=feedface"]}})

    check_error(run, "UPLOAD_FAILED")
    assert run.final["error"] == (
        f"UPLOAD_FAILED: PUT to presigned URL failed: connection reset from {url} "
        "(gave up after 4 attempts)")
    assert http_server.hits("/out/instrumental.mp3") == 4
    assert "/out/instrumental.mp3" not in http_server.uploads
    assert_clean(work_dir)
    run_good_job(work_dir, clip)


def test_download_reset_once_is_retried(http_server, work_dir, clip):
    data, samples = clip
    url = http_server.route("/in.wav", Reset(data, after_bytes=len(data) // 2), Serve(data))

    run = run_in_process({"id": "get-reset", "input": {"audio_url": url,
                                                       "return_base64": True}})

    check_final(run.final, n_outputs=1)
    assert http_server.hits("/in.wav") == 2
    out = run.final["outputs"][0]
    check_audio(fetch(out["url"]), out, samples=samples, channels=1)
    assert_clean(work_dir)


def test_download_reset_always_fails(http_server, work_dir, clip):
    data, _ = clip
    url = http_server.route("/in.wav", Reset(data, after_bytes=len(data) // 2))

    run = run_in_process({"id": "get-reset", "input": {"audio_url": url + "?sig=0123",
                                                       "return_base64": True}})

    check_error(run, "DOWNLOAD_FAILED")
    assert run.final["error"] == (
        f"DOWNLOAD_FAILED: connection reset from {url} (gave up after 4 attempts)")
    assert http_server.hits("/in.wav") == 4
    assert_clean(work_dir)
    run_good_job(work_dir, clip)


# --- a full temp disk ---------------------------------------------------------------------


def mount_tmpfs(mount: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` at ``mount``; None on success, else why not."""
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700",
                               "tmpfs", str(mount)], capture_output=True, text=True, timeout=30)
    except OSError as e:
        return str(e)
    return None if proc.returncode == 0 else (proc.stderr.strip()[:200] or "mount failed")


@pytest.fixture(scope="module")
def tmpfs_unavailable(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    probe = tmp_path_factory.mktemp("probe")
    why = mount_tmpfs(probe, "64k")
    if why is None:
        subprocess.run(["umount", str(probe)], check=False)
    return why


@pytest.fixture
def tiny_disk(tmp_path: Path, tmpfs_unavailable: str | None) -> Iterator[Path]:
    """A real 512 KiB tmpfs (needs root / CAP_SYS_ADMIN), unmounted after the test."""
    if tmpfs_unavailable:
        pytest.skip(f"cannot mount a small tmpfs here ({tmpfs_unavailable}); "
                    "test_disk_full_rlimit covers a full disk without privileges")
    mount = tmp_path / "tiny-disk"
    mount.mkdir()
    why = mount_tmpfs(mount, "512k")
    assert why is None, why
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        if os.path.ismount(mount):
            subprocess.run(["umount", "-l", str(mount)], check=False)


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_disk_full(tiny_disk, monkeypatch, http_server, clip):
    monkeypatch.setenv("WORK_DIR", str(tiny_disk))
    baseline = used_bytes(tiny_disk)
    big, _ = input_bytes(4.0)  # 706 KB: does not fit
    mid, _ = input_bytes(2.0)  # 353 KB: fits, but not with three stereo stems beside it
    no_space = "INTERNAL: no space left on the worker's temporary disk"

    # 1. The input itself does not fit (inline and downloaded).
    for source in ({"audio_base64": b64(big)},
                   {"audio_url": http_server.route("/big.wav", Serve(big))}):
        run = run_in_process({"id": "full", "input": {**source, "return_base64": True}})
        check_error(run, "INTERNAL")
        assert run.final["error"] == no_space
        assert_clean(tiny_disk)
        assert used_bytes(tiny_disk) == baseline

    # 2. The input fits; the outputs do not (ENOSPC while encoding), in every format.
    for fmt in ("wav", "mp3"):  # libsndfile's writer (WAV, FLAC) and our MP3 writer
        run = run_in_process({"id": "full", "input": {
            "audio_base64": b64(mid), "return_base64": True, "output_format": fmt,
            "channels": 2, "stems": "vocals,instrumental,accompaniment",  # 3 stems
            "mp3_bitrate": 320}})
        check_error(run, "INTERNAL")
        assert run.final["error"] == no_space, fmt
        assert run.progress[-1]["stage"] == "separate", fmt  # it failed while writing stems
        assert_clean(tiny_disk)
        assert used_bytes(tiny_disk) == baseline

    # 3. The same worker, same disk: a job that fits succeeds.
    run_good_job(tiny_disk, clip)  # a 176 KB input


RLIMIT_SCRIPT = r"""
import base64, json, resource, signal, sys
from worker_helpers import input_bytes
from handler.service.runner import run_job

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
data, _ = input_bytes(float(sys.argv[1]))
job = {"input": {"audio_base64": base64.b64encode(data).decode(), "return_base64": True}}
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (100 * 1024, hard))
bad = list(run_job({"id": "bad", **job}))[-1]
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
good = list(run_job({"id": "good", **job}))[-1]
print(json.dumps({"bad": bad, "good": {k: good.get(k) for k in ("status", "error")}}))
"""


def test_disk_full_rlimit(tmp_path, work_dir, tmpfs_unavailable):
    """Without privileges: a file-size limit (RLIMIT_FSIZE) makes writes fail with EFBIG."""
    from worker_helpers import ROOT, worker_env

    if not tmpfs_unavailable:
        pytest.skip("a real full disk (tmpfs) is tested by test_disk_full")
    proc = subprocess.run(
        ["python", "-c", RLIMIT_SCRIPT, "1.0"], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env=worker_env(WORK_DIR=str(work_dir),
                                    PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert result["bad"] == {"error": "INTERNAL: a file on the worker's temporary disk "
                                      "exceeded the allowed size"}
    assert result["good"] == {"status": "completed", "error": None}
    assert_clean(work_dir)


# --- cancelled mid-separation -------------------------------------------------------------


def test_cancel_mid_separation(work_dir, clip):
    from handler.core.models import get_model, loaded_models
    from handler.service.runner import run_job

    model = get_model("spleeter_2stems")
    data, _ = clip
    # shifts=12: twelve passes of the network, so the job is cancelled well before its end.
    gen = run_job({"id": "cancel-me", "input": {"audio_base64": b64(data), "shifts": 12,
                                                "return_base64": True}})
    started = time.monotonic()
    seen = []
    for item in gen:
        seen.append(item)
        assert item.get("status") == "progress", item
        if item["stage"] == "separate":
            break
    chunk_s = time.monotonic() - started
    assert seen[-1]["total_segments"] == 12 and seen[-1]["completed_segments"] < 12
    assert any(t.name == "job-cancel-me" for t in threading.enumerate())
    assert list(work_dir.iterdir())  # its temp folder exists while it runs

    t0 = time.monotonic()
    gen.close()  # what the SDK does on cancel / timeout
    closing_s = time.monotonic() - t0

    # It stopped at the next chunk, not after the remaining ~11 passes.
    assert closing_s < max(3 * chunk_s, 2.0), (closing_s, chunk_s)
    assert not any(t.name == "job-cancel-me" for t in threading.enumerate())
    assert_clean(work_dir)
    # The model is still loaded (same object) and serves the next job.
    assert "spleeter_2stems" in loaded_models() and get_model("spleeter_2stems") is model
    run_good_job(work_dir, clip)
    assert get_model("spleeter_2stems") is model


# --- a multipart upload interrupted mid-way ----------------------------------------------


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 to ``target_port``: a client connection that has sent more
    than ``cut_after`` bytes is reset (RST) on the spot, like a network dying mid-transfer.
    Small requests pass; big request bodies (multipart parts) never get through."""

    def __init__(self, target_port: int, cut_after: int | None) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.resets = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def __enter__(self) -> CuttingProxy:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in list(self._threads):
            t.join(timeout=5)
        self.listener.close()

    def _spawn(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            self._spawn(self._pipe, client)

    def _pipe(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        for s in (client, upstream):
            s.settimeout(0.2)
        sent = 0
        done = threading.Event()

        def down() -> None:
            while not done.is_set() and not self._stop.is_set():
                try:
                    chunk = upstream.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                try:
                    client.sendall(chunk)
                except OSError:
                    break
            done.set()

        self._spawn(down)
        try:
            while not done.is_set() and not self._stop.is_set():
                try:
                    chunk = client.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                if self.cut_after is not None and sent + len(chunk) > self.cut_after:
                    with self._lock:
                        self.resets += 1
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack("ii", 1, 0))
                    break
                upstream.sendall(chunk)
                sent += len(chunk)
        finally:
            done.set()
            client.close()
            upstream.close()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """17 MB: over the 16 MB multipart threshold (parts of 16 MB and 1 MB)."""
    path = tmp_path_factory.mktemp("big") / "instrumental.wav"
    path.write_bytes(os.urandom(17 * MB))
    return path


def test_interrupted_multipart_upload_leaves_nothing(s3_server, big_file, monkeypatch):
    monkeypatch.setenv("S3_MAX_ATTEMPTS", "2")
    bucket = s3_server.create_bucket()
    direct = s3_server.client()
    key = "separations/job-1/instrumental.wav"
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])

    with CuttingProxy(port, cut_after=4 * MB) as proxy:
        client = s3.make_client(s3_server.settings(bucket, endpoint_url=proxy.url))
        with pytest.raises(UploadFailed) as info:
            s3.upload_file(client, big_file, bucket, key, "audio/wav")
        assert proxy.resets >= 2  # the 16 MB part, tried S3_MAX_ATTEMPTS times

    assert str(info.value).startswith(f"UPLOAD_FAILED: could not upload s3://{bucket}/{key}: ")
    # No object at the final key, nor anywhere; the multipart upload was aborted, so no
    # uploaded part lingers (the 1 MB part got through before the abort).
    assert direct.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    assert "Uploads" not in direct.list_multipart_uploads(Bucket=bucket)

    # The same proxy without cuts: the upload goes through whole (the fault was the cuts).
    with CuttingProxy(port, cut_after=None) as proxy:
        client = s3.make_client(s3_server.settings(bucket, endpoint_url=proxy.url))
        s3.upload_file(client, big_file, bucket, key, "audio/wav")
    body = direct.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(big_file.read_bytes()).digest()


# --- a retried job never touches another job's output -------------------------------------


def test_retried_job_only_rewrites_its_own_keys(s3_env, s3_server, work_dir):
    client = s3_server.client()
    inputs = {name: input_bytes(1.0, seed=i)[0] for i, name in enumerate("ABC")}

    def run(job_id: str, data: bytes) -> dict:
        result = run_in_process({"id": job_id, "input": {"audio_base64": b64(data)}})
        check_final(result.final, n_outputs=1)
        return result.final["outputs"][0]

    def etags() -> dict[str, str]:
        listing = client.list_objects_v2(Bucket=s3_env)
        return {o["Key"]: o["ETag"] for o in listing.get("Contents", [])}

    a = run("job-A", inputs["A"])
    b = run("job-B", inputs["B"])
    assert a["key"] == "separations/job-A/instrumental.mp3"
    assert b["key"] == "separations/job-B/instrumental.mp3"
    before = etags()

    # job-A retried (the platform re-runs the same id), this time on other audio.
    again = run("job-A", inputs["C"])

    after = etags()
    assert again["key"] == a["key"]
    assert after[b["key"]] == before[b["key"]]  # job-B untouched
    assert after[a["key"]] != before[a["key"]]  # job-A's own output replaced
    assert set(after) == set(before)

    # Ids that would name another folder, or a dot segment, get a folder of their own.
    for hostile in ("job-B/../job-A", "..", "job?B"):
        out = run(hostile, inputs["C"])
        segment = out["key"].split("/")[1]
        assert out["key"] == f"separations/{segment}/instrumental.mp3"
        assert segment not in (".", "..", "job-A", "job-B")
        assert etags()[b["key"]] == before[b["key"]] and etags()[a["key"]] == after[a["key"]]
    keys = set(etags())
    assert len(keys) == 2 + 3  # three more distinct folders
    assert_clean(work_dir)
