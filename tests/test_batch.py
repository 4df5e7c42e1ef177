"""Many inputs per ``demucs-separate`` run (handler/adapters/batch.py, cli.py, fanout.py), and
the first-use fixes of issue 16: real files and folders, the packaged model (spleeter_2stems)
on short clips, the self-hosted service (``handler.adapters.http``) as the endpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from server_helpers import long_wav, thread_server
from worker_helpers import ROOT, worker_env, write_input

from handler.adapters import batch
from handler.adapters.cli import main
from handler.core.encode import SoundfileWriter

BUCKET_VARS = ("BUCKET_NAME", "BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID",
               "BUCKET_SECRET_ACCESS_KEY")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_THREADS", "1")
    monkeypatch.setenv("DEFAULT_MODEL", "spleeter_2stems")
    for name in BUCKET_VARS:
        monkeypatch.delenv(name, raising=False)


def clips(folder: Path, names: list[str], seconds: float = 0.6) -> list[Path]:
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_input(path, seconds, fmt=path.suffix.lstrip("."), seed=i)
        paths.append(path)
    return paths


def manifest_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- planning: inputs, names, shards (no model) ---------------------------------------------


@pytest.mark.unit
def test_folders_globs_and_lists_expand_to_audio_files_once(tmp_path: Path) -> None:
    music = tmp_path / "music"
    for name in ("a.wav", "sub/b.flac", "sub/deeper/c.mp3", "cover.jpg", "notes.txt"):
        (music / name).parent.mkdir(parents=True, exist_ok=True)
        (music / name).write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n{music / 'a.wav'}\n\nhttps://host/x/My%20Song.mp3\n")
    items = batch.expand_inputs([str(music), str(music / "sub" / "*.flac"),
                                 *batch.read_input_list(listing)])
    assert [(i.track, i.trackext) for i in items] == [
        ("a", "wav"), ("b", "flac"), ("c", "mp3"), ("My Song", "mp3")]
    with pytest.raises(Exception, match="no audio files in"):
        batch.expand_inputs([str(music / "*.txt")])
    with pytest.raises(Exception, match="input file not found"):
        batch.expand_inputs([str(music / "missing.wav")])


@pytest.mark.unit
def test_shards_cover_every_input_exactly_once(tmp_path: Path) -> None:
    items = [batch.Item(f"/in/{i:02d}.wav", f"{i:02d}", "wav") for i in range(23)]
    for n in (1, 2, 3, 5, 23, 30):
        shards = [batch.shard(list(reversed(items)) if k % 2 else items, k, n)
                  for k in range(n)]  # the order inputs were given in does not matter
        seen = [it.source for s in shards for it in s]
        assert sorted(seen) == sorted(it.source for it in items)
        assert len(seen) == len(set(seen))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    assert batch.parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "x", "1/0"):
        with pytest.raises(Exception, match="--shard"):
            batch.parse_shard(bad)


@pytest.mark.unit
def test_output_names_follow_the_template_and_clashes_are_refused(tmp_path: Path) -> None:
    a = batch.Item("/x/a/song.wav", "song", "wav")
    b = batch.Item("/x/b/song.flac", "song", "flac")
    one = batch.plan_outputs([a], tmp_path, None, ["instrumental"], "mp3")
    assert one.outputs[a.source]["instrumental"] == (tmp_path / "instrumental.mp3").resolve()
    with pytest.raises(Exception, match="would both write"):
        batch.plan_outputs([a, b], tmp_path, None, ["instrumental"], "mp3")
    plan = batch.plan_outputs([a, b], tmp_path, "{track}.{trackext}/{stem}.{ext}",
                              ["vocals", "instrumental"], "wav")
    assert plan.path(b, "vocals", 1) == (tmp_path / "song.flac" / "vocals_001.wav").resolve()
    for template, message in (("{track}.{ext}", "include {stem}"), ("../{stem}.{ext}",
                              "leaves the output folder"), ("{nope}", "unknown")):
        with pytest.raises(Exception, match=re.escape(message)):
            batch.plan_outputs([a], tmp_path, template, ["vocals", "instrumental"], "wav")


@pytest.mark.unit
def test_float_wav_keeps_peaks_above_full_scale_and_24_bit_is_24_bit(tmp_path: Path) -> None:
    block = np.array([[0.5, 1.5, -2.0, 0.25]], np.float32)
    for depth, fmt, subtype in (("32f", "wav", "FLOAT"), ("24", "flac", "PCM_24"),
                                ("24", "wav", "PCM_24"), ("16", "wav", "PCM_16")):
        path = tmp_path / f"x{depth}.{fmt}"
        w = SoundfileWriter(path, fmt, 44100, 1, depth)
        w.write(block)
        w.close()
        data, _ = sf.read(path, dtype="float32", always_2d=True)
        assert sf.info(str(path)).subtype == subtype
        want = block[0] if depth == "32f" else np.clip(block[0], -1, 1)
        np.testing.assert_allclose(data[:, 0], want, atol=1e-4)
    with pytest.raises(ValueError):
        SoundfileWriter(tmp_path / "x.flac", "flac", 44100, 1, "32f")


# --- local runs -------------------------------------------------------------------------------


def test_batch_with_a_failing_file_then_resume_and_overwrite(env, tmp_path: Path,
                                                             capsys) -> None:
    music = tmp_path / "music"
    clips(music, ["one.wav", "two.flac", "sub/three.wav"])
    (music / "bad.mp3").write_text("<html>not audio</html>\n" * 50)
    out, manifest = tmp_path / "out", tmp_path / "out" / "manifest.jsonl"
    argv = ["-i", str(music), "-o", str(out), "--manifest", str(manifest), "-q", "--jobs", "2"]

    assert main(argv) == 1  # one file failed; every other one was still done
    err = capsys.readouterr().err
    assert re.search(r"failed .*bad\.mp3\s+UNSUPPORTED_AUDIO", err), err
    assert "3 done, 1 failed" in err
    done = {p.relative_to(out).as_posix() for p in out.rglob("*.mp3")}
    assert done == {"one/instrumental.mp3", "two/instrumental.mp3", "three/instrumental.mp3"}
    recs = manifest_lines(manifest)
    assert sorted(r["status"] for r in recs) == ["done", "done", "done", "failed"]
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.mp3")}

    (music / "bad.mp3").unlink()
    clips(music, ["bad.mp3"], 0.6)
    assert main(argv) == 0  # resume: only the file that failed runs again
    err = capsys.readouterr().err
    assert "1 done, 3 skipped" in err
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert (out / "bad" / "instrumental.mp3").is_file()

    assert main([*argv, "--overwrite", "--jobs", "1"]) == 0
    assert "4 done" in capsys.readouterr().err
    assert all(p.stat().st_mtime_ns != t for p, t in mtimes.items())
    assert len(manifest_lines(manifest)) == 4 + 1 + 4


def test_clash_and_bad_output_are_refused_before_any_work(env, tmp_path: Path, capsys) -> None:
    a, b = clips(tmp_path, ["a/song.wav", "b/song.wav"])
    out = tmp_path / "out"
    assert main(["-i", str(a), "-i", str(b), "-o", str(out), "-q"]) == 1
    assert "would both write" in capsys.readouterr().err
    assert not out.exists()
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    assert main(["-i", str(a), "-o", str(afile), "-q"]) == 1
    assert "exists and is not a directory" in capsys.readouterr().err
    assert afile.read_text() == "x"


def test_single_input_layout_all_stems_once_and_24_bit_flac(env, tmp_path: Path,
                                                            capsys) -> None:
    (song,) = clips(tmp_path, ["song.wav"])
    out = tmp_path / "out"
    assert main(["-i", str(song), "-o", str(out), "--all-stems", "--format", "flac",
                 "--bit-depth", "24", "-q"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["instrumental.flac", "vocals.flac"]  # no byte-identical accompaniment
    assert {sf.info(str(p)).subtype for p in out.iterdir()} == {"PCM_24"}
    assert main(["-i", str(song), "-o", str(out), "--format", "mp3", "--bit-depth", "24"]) == 1
    assert "bit_depth applies to wav and flac" in capsys.readouterr().err


def test_list_models_names_availability_and_the_bake_command(env, tmp_path, monkeypatch,
                                                             capsys) -> None:
    from devtools import msst as stand_in

    monkeypatch.setenv("MODELS_DIR", str(tmp_path / "models"))
    stand_in.write_pair(tmp_path / "models", "my_instvoc", stand_in.small(
        stand_in.MDX23C_INSTVOC, "mdx23c", dim_t=32, num_overlap=2))
    assert main(["--list-models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    mine = next(line for line in lines if line.split()[0] == "my_instvoc")
    assert mine.split()[1:] == ["vocals,instrumental", "available:", "baked"]
    spleeter = next(line for line in lines if line.split()[0] == "spleeter_2stems")
    assert "vocals,instrumental" in spleeter and "available" in spleeter
    six = next(line for line in lines if line.split()[0] == "htdemucs_6s")
    assert "guitar,piano" in six
    assert six.endswith(f"python builder/bake_models.py --models htdemucs_6s --dest "
                        f"{tmp_path / 'models'}")


def test_handler_runs_a_local_file_and_a_job_file(env, tmp_path: Path, monkeypatch,
                                                  capsys) -> None:
    from handler import handler as worker

    monkeypatch.chdir(tmp_path)
    song = tmp_path / "song.wav"
    write_input(song, 4.0)  # as base64 on a command line it would be ~1 MB
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"input": {"output_format": "wav", "bit_depth": "32f"}}))
    code = worker.main(["--input-file", str(song), "--test_input_file", str(job),
                        "--output-dir", str(tmp_path / "res")])
    final = json.loads(capsys.readouterr().out)
    assert code == 0, final
    assert final["outputs"][0]["url"] == (tmp_path / "res" / "instrumental.wav").as_uri()
    assert sf.info(str(tmp_path / "res" / "instrumental.wav")).subtype == "FLOAT"


# --- fan-out through the self-hosted service --------------------------------------------------


@pytest.fixture
def server(env, tmp_path: Path) -> Iterator:
    with thread_server(tmp_path / "server") as srv:
        yield srv


def test_fanout_to_the_service_with_a_failure_then_resume(server, tmp_path: Path,
                                                          capsys) -> None:
    music = tmp_path / "music"
    clips(music, ["a.wav", "b.wav", "c.flac"], 0.6)
    (music / "broken.wav").write_bytes(b"RIFF" + os.urandom(3000))
    out, manifest = tmp_path / "out", tmp_path / "manifest.jsonl"
    argv = ["-i", str(music), "-o", str(out), "--endpoint", server.url, "--concurrency", "4",
            "--manifest", str(manifest), "--stems", "vocals,instrumental", "-q"]

    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "3 done, 1 failed" in err, err
    recs = {Path(r["source"]).name: r for r in manifest_lines(manifest)}
    assert recs["broken.wav"]["status"] == "failed"
    assert recs["broken.wav"]["error"].startswith("UNSUPPORTED_AUDIO")
    for track in ("a", "b", "c"):
        assert recs[f"{track}.{'flac' if track == 'c' else 'wav'}"]["job_id"]
        for stem in ("vocals", "instrumental"):
            data, rate = sf.read(out / track / f"{stem}.mp3")
            assert rate == 44100 and abs(len(data) - 0.6 * rate) < 0.01 * rate
    jobs_before = sum(server.service.store.counts().values())

    (music / "broken.wav").unlink()
    assert main(argv) == 0  # resumed: nothing left to do, no job submitted
    assert "3 skipped" in capsys.readouterr().err
    assert sum(server.service.store.counts().values()) == jobs_before


def test_ctrl_c_cancels_the_jobs_in_flight(server, tmp_path: Path) -> None:
    music = tmp_path / "music"
    music.mkdir()
    for i in range(3):
        (music / f"long{i}.wav").write_bytes(long_wav(40.0))
    log = tmp_path / "cli.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "handler.adapters.cli", "-i", str(music), "-o",
             str(tmp_path / "out"), "--endpoint", server.url, "--concurrency", "2", "-q"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=err, env=worker_env())
    client = server.client()
    try:
        deadline = time.monotonic() + 120
        ids: list[str] = []
        while time.monotonic() < deadline:
            ids = re.findall(r"queued (\w+)", log.read_text())
            if len(ids) == 2 and any(client.status(j)["status"] == "IN_PROGRESS" for j in ids):
                break
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        assert len(ids) == 2, log.read_text()  # bounded: 2 in flight, the third not sent
        proc.send_signal(signal.SIGINT)
        proc.wait(180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, log.read_text()
    assert "interrupted by SIGINT" in log.read_text()
    for job_id in ids:
        assert client.wait(job_id, timeout_s=180)["status"] == "CANCELLED"


def test_an_s3_prefix_is_read_with_the_workers_credentials(env, s3_server, fast_local_network,
                                                           monkeypatch, tmp_path: Path,
                                                           capsys) -> None:
    from devtools.servers import bucket_env

    bucket = s3_server.create_bucket()
    for name, value in bucket_env(s3_server.endpoint_url, bucket).items():
        monkeypatch.setenv(name, value)
    client = s3_server.client()
    for i, key in enumerate(("in/x.wav", "in/deep/y.wav", "in/readme.txt", "other/z.wav")):
        data = tmp_path / f"up{i}"
        write_input(data, 0.5, seed=i)
        client.upload_file(str(data), bucket, key)
    out = tmp_path / "out"
    assert main(["-i", f"s3://{bucket}/in/", "-o", str(out), "-q"]) == 0, \
        capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.mp3")) == [
        "x/instrumental.mp3", "y/instrumental.mp3"]


def test_endpoint_requests_retry_on_429_5xx_and_network_errors(http_server) -> None:
    from devtools.net import free_port
    from devtools.servers import Serve, Status
    from handler.adapters.fanout import EndpointClient
    from handler.errors import WorkerError

    body = json.dumps({"id": "j1", "status": "IN_PROGRESS"}).encode()
    http_server.route("/status/j1", Status(429, headers={"Retry-After": "0.2"}), Status(503),
                      Status(502), Serve(body, "application/json"))
    http_server.route("/status/j2", Status(400, b"bad request"), Serve(body))
    client = EndpointClient(http_server.base_url, None, retries=4, backoff_s=0.01)
    started = time.monotonic()
    assert client.call("GET", "status/j1")["status"] == "IN_PROGRESS"
    assert http_server.hits("/status/j1") == 4
    assert time.monotonic() - started >= 0.2  # Retry-After honoured
    with pytest.raises(WorkerError, match="HTTP 400"):
        client.call("GET", "status/j2")
    assert http_server.hits("/status/j2") == 1  # a client error is not retried
    closed = EndpointClient(f"http://127.0.0.1:{free_port()}", None, retries=2, backoff_s=0.01)
    with pytest.raises(WorkerError, match="unreachable"):
        closed.call("GET", "status/j1")


def test_a_killed_fanout_resumes_by_attaching_to_its_jobs(server, tmp_path: Path,
                                                         capsys) -> None:
    music = tmp_path / "music"
    music.mkdir()
    for i in range(2):
        (music / f"song{i}.wav").write_bytes(long_wav(15.0))
    out, manifest = tmp_path / "out", tmp_path / "manifest.jsonl"
    argv = ["-i", str(music), "-o", str(out), "--endpoint", server.url, "--concurrency", "2",
            "--manifest", str(manifest), "-q"]
    log = tmp_path / "cli.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "handler.adapters.cli", *argv], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=err, env=worker_env())
    try:
        deadline = time.monotonic() + 120
        while len(re.findall(r"queued (\w+)", log.read_text())) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.2)
        proc.kill()  # no chance to cancel: the jobs go on on the server
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ids = set(re.findall(r"queued (\w+)", log.read_text()))
    assert {r["job_id"] for r in manifest_lines(manifest) if r["status"] == "submitted"} == ids

    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert set(re.findall(r"attached (\w+)", err)) == ids and "queued" not in err
    assert sum(server.service.store.counts().values()) == 2  # nothing submitted twice
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.mp3")) == [
        "song0/instrumental.mp3", "song1/instrumental.mp3"]
