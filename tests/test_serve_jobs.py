"""Video jobs of ``streamgpen serve``: uploads and sources run in the background, their progress,
results (frames, pts and audio as the input's, read by ffprobe; Range requests), cancellation
(a playable partial), a restart that finds them again, and the requests a job refuses.

The service runs the identity model with the mobilenet detector on the CPU, behind the real app
(``service.app.build_app``) on a real HTTP server, in this process: a restart is a new
``Service`` on the same spool.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import pytest
import torch
from probe import ffprobe

from streamgpen.config import RunConfig, SinkConfig, VideoConfig
from streamgpen.enhancer import Enhancer
from streamgpen.runtime.restorer import Identity, Restorer
from streamgpen.service.app import build_app
from streamgpen.service.core import Service, ServiceLimits
from streamgpen.web.server import HttpServer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "solvay_pan.mp4"
SAMPLE_FRAMES = 100
TOKEN = "jobs-test-token"
TIMEOUT_S = 60.0


def cut_clip(source: Path, target: Path, frames: int) -> int:
    """The first ``frames`` (or a few more) frames of ``source`` and its audio up to their end,
    remuxed packet for packet: the shortest run of video packets, in decode order, whose pictures
    are the first N frames (a B-frame's reference is never cut off). Returns N."""
    with av.open(str(source)) as src:
        kept: list[int] = []
        for packet in src.demux(video=0):
            if packet.pts is None:
                continue
            kept.append(packet.pts)
            step = packet.duration
            if len(kept) >= frames and max(kept) - min(kept) == (len(kept) - 1) * step:
                break
        end = (max(kept) + step) * src.streams.video[0].time_base
    with av.open(str(source)) as src, av.open(str(target), "w") as dst:
        video = dst.add_stream_from_template(src.streams.video[0])
        audio = dst.add_stream_from_template(src.streams.audio[0])
        for packet in src.demux():
            if packet.pts is None:
                continue
            if packet.stream.type == "video" and packet.pts in kept:
                packet.stream = video
            elif packet.stream.type == "audio" and packet.pts * packet.time_base < end:
                packet.stream = audio
            else:
                continue
            dst.mux(packet)
    return len(kept)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, int]:
    """The sample's first 13 frames (the first cut at >= 12 that keeps its B-frames whole) with
    their audio: a job of ~3 s on this CPU instead of ~23 s for the whole sample (~230 ms a
    frame, measured with one thread on the 2-core CPU under load: mostly RetinaFace at 960x540)."""
    path = tmp_path_factory.mktemp("clip") / "short.mp4"
    return path, cut_clip(SAMPLE, path, 12)


@pytest.fixture(scope="module")
def enhancer(detector) -> Enhancer:
    return Enhancer(
        restorer=Restorer(Identity(), torch.device("cpu"), batch_size=8),
        face_detector=detector,
        device="cpu",
        mask="box",
        # One face pasted a frame: the paste of the sample's ~29 faces is ~0.45 s a frame here.
        only_center_face=True,
    )


class Serving:
    """A started service on ``spool`` behind its app on a real HTTP server, and a client."""

    def __init__(self, enhancer: Enhancer, spool: Path, **limits):
        # ultrafast: a 13-frame job took 2.9 s, 4.8 s at medium (one thread, this CPU, loaded).
        config = RunConfig(input="", video=VideoConfig(sink=SinkConfig(preset="ultrafast")))
        self.service = Service(
            config=config,
            enhancer=enhancer,
            spool=spool,
            limits=ServiceLimits(**limits),
            token=TOKEN,
        ).start()
        app = build_app(self.service, cookie_name="streamgpen_jobs_test")
        self.server = HttpServer(app, "127.0.0.1").start()
        self.client = httpx.Client(
            base_url=self.server.url(""),
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=TIMEOUT_S,
        )

    def close(self) -> None:
        self.client.close()
        self.server.stop()
        self.service.close()

    def upload(self, path: Path, **fields) -> httpx.Response:
        """POST ``path`` as a job on a connection of its own, closed once answered: the job
        goes on without it."""
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with path.open("rb") as file, httpx.Client(headers=headers, timeout=TIMEOUT_S) as client:
            files = {"file": (path.name, file, "video/mp4")}
            return client.post(self.server.url("/v1/jobs"), files=files, data=fields)

    def job(self, job_id: str) -> dict:
        response = self.client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, job_id: str, done, what: str) -> tuple[dict, list[dict]]:
        """Poll the job until ``done(job)``; the job then, and every poll's view."""
        polls = []
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            polls.append(self.job(job_id))
            if done(polls[-1]):
                return polls[-1], polls
            time.sleep(0.02)
        pytest.fail(f"timed out waiting for {what}: {polls[-1]}")

    def gauge(self, state: str) -> float:
        registry = self.service.metrics.registry
        return registry.get_sample_value("streamgpen_jobs", {"state": state})


def finished(job: dict) -> bool:
    return job["state"] in ("succeeded", "failed", "canceled")


@pytest.fixture
def serving(enhancer: Enhancer, tmp_path: Path) -> Iterator[Serving]:
    serving = Serving(enhancer, tmp_path / "spool")
    try:
        yield serving
    finally:
        serving.close()


def audio_packets(path: Path) -> list[tuple]:
    """Each audio packet's pts, size and MD5, as ffprobe reads them. (Not the first packet's
    duration and skip-samples side data: the fragmented MP4 the sink writes keeps neither, as for
    ``enhance``; the priming is in its edit list.)"""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_data_hash", "MD5",
         "-show_entries", "packet=pts,size,data_hash", "-of", "json", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [(p["pts"], p["size"], p["data_hash"]) for p in json.loads(out)["packets"]]


def decoded_frames(path: Path) -> int:
    """The video frames ffprobe decodes (it fails on a file that does not play)."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
         "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return int(out.strip())


def test_an_uploaded_job_runs_with_progress_to_the_input_s_frames_pts_and_audio(
    serving: Serving, clip, tmp_path: Path
):
    path, frames = clip
    response = serving.upload(path, blend="1", mask="box")
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] in ("queued", "running") and job["source"]["filename"] == "short.mp4"
    job, polls = serving.wait(job["id"], finished, "the job")
    assert job["state"] == "succeeded", job
    assert job["progress"]["frames_done"] == job["progress"]["frames_total"] == frames
    # Polled every ~20 ms during a ~3 s run (13 frames at ~220 ms each, measured): the progress
    # is seen between its ends, with a rate and an ETA.
    between = [p for p in polls if 0 < p["progress"]["frames_done"] < frames]
    assert between, [p["progress"] for p in polls]
    assert all(p["progress"]["fps"] > 0 and p["progress"]["eta_s"] >= 0 for p in between)
    assert serving.gauge("succeeded") == 1 and serving.gauge("running") == 0

    result = serving.client.get(job["result"])
    assert result.status_code == 200 and result.headers["content-type"] == "video/mp4"
    out = tmp_path / "result.mp4"
    out.write_bytes(result.content)
    assert ffprobe(out, "v:0", "frame=pts_time") == ffprobe(path, "v:0", "frame=pts_time")
    assert decoded_frames(out) == frames
    assert audio_packets(out) == audio_packets(path) and len(audio_packets(path)) == 26

    ranged = serving.client.get(job["result"], headers={"Range": "bytes=1000-4999"})
    assert ranged.status_code == 206
    assert ranged.headers["content-range"] == f"bytes 1000-4999/{len(result.content)}"
    assert ranged.content == result.content[1000:5000]
    listed = serving.client.get("/v1/jobs").json()["jobs"]
    assert [j["id"] for j in listed] == [job["id"]] and listed[0]["state"] == "succeeded"


def test_a_canceled_job_keeps_a_playable_partial_output(serving: Serving, tmp_path: Path):
    job = serving.upload(SAMPLE).json()
    early = serving.job(job["id"])
    assert serving.client.get(f"/v1/jobs/{job['id']}/result").status_code == 409
    serving.wait(job["id"], lambda j: j["progress"]["frames_done"] >= 3, "3 frames")
    response = serving.client.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["state"] == "canceled" and job["error"] is None, job
    assert early["state"] in ("queued", "running")
    out = tmp_path / "partial.mp4"
    out.write_bytes(serving.client.get(job["result"]).content)
    written = decoded_frames(out)
    assert 3 <= written < SAMPLE_FRAMES and written == job["progress"]["frames_done"]
    # The audio stops where the video does (one packet of 21 ms over at most).
    audio_end = max(float(t) for t in ffprobe(out, "a:0", "packet=pts_time"))
    assert audio_end <= written / 25 + 0.05
    assert serving.gauge("canceled") == 1
    # A finished job is removed with its files.
    assert serving.client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert serving.client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert not (serving.service.spool / "jobs" / job["id"]).exists()


def test_a_restart_finds_finished_jobs_and_runs_queued_ones(enhancer, clip, tmp_path: Path):
    path, frames = clip
    spool = tmp_path / "spool"
    first = Serving(enhancer, spool)
    try:
        done = first.upload(path).json()
        first.wait(done["id"], finished, "the first job")
        long = first.upload(SAMPLE).json()
        queued = first.upload(path).json()
        first.wait(long["id"], lambda j: j["progress"]["frames_done"] >= 3, "the long job")
        result = first.client.get(f"/v1/jobs/{done['id']}/result").content
    finally:
        first.close()  # while the long job runs and the last one waits
    second = Serving(enhancer, spool)
    try:
        jobs = {j["id"]: j for j in second.client.get("/v1/jobs").json()["jobs"]}
        assert list(jobs) == [done["id"], long["id"], queued["id"]]
        assert jobs[done["id"]]["state"] == "succeeded"
        assert jobs[done["id"]]["progress"]["frames_done"] == frames
        assert second.client.get(f"/v1/jobs/{done['id']}/result").content == result
        # The job the server stopped during failed, its output finished and playable.
        interrupted = jobs[long["id"]]
        assert interrupted["state"] == "failed", interrupted
        assert interrupted["error"] == "interrupted: the server stopped during the job"
        partial = tmp_path / "partial.mp4"
        partial.write_bytes(second.client.get(interrupted["result"]).content)
        assert 3 <= decoded_frames(partial) < SAMPLE_FRAMES
        assert jobs[queued["id"]]["state"] in ("queued", "running")
        second.wait(queued["id"], lambda j: j["progress"]["frames_done"], "the queued job to run")
        assert second.gauge("succeeded") == 1 and second.gauge("failed") == 1
    finally:
        second.close()


def test_a_job_that_died_with_its_server_is_failed_at_the_next_start(
    enhancer, clip, tmp_path: Path
):
    path, _ = clip
    spool = tmp_path / "spool"
    first = Serving(enhancer, spool)
    try:
        job = first.upload(path).json()
        assert first.client.delete(f"/v1/jobs/{job['id']}").json()["state"] == "canceled"
    finally:
        first.close()
    # What a SIGKILLed server leaves: job.json saying running, no finished output.
    record_path = spool / "jobs" / job["id"] / "job.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "state": "running", "finished": None}))
    (spool / "jobs" / job["id"] / "output.mp4").unlink(missing_ok=True)
    # And an upload it was receiving: a folder with no job.json, which nobody knows of.
    (spool / "jobs" / secrets.token_hex(8)).mkdir()
    second = Serving(enhancer, spool)
    try:
        found = second.job(job["id"])
        assert found["state"] == "failed" and found["result"] is None
        assert found["error"] == "interrupted: the server stopped during the job"
        assert json.loads(record_path.read_text())["state"] == "failed"
        assert [p.name for p in (spool / "jobs").iterdir()] == [job["id"]]
        assert second.client.get(f"/v1/jobs/{job['id']}/result").status_code == 409
    finally:
        second.close()


def test_sources_are_files_of_the_source_folder_or_urls(enhancer, clip, tmp_path: Path):
    path, frames = clip
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "clip.mp4").write_bytes(path.read_bytes())
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(path.read_bytes())
    (videos / "link.mp4").symlink_to(outside)
    serving = Serving(enhancer, tmp_path / "spool", source_dir=videos)
    try:
        refused = {
            "../outside.mp4": 400,
            str(outside): 400,
            "link.mp4": 400,
            "missing.mp4": 400,
            ".": 400,
            "webcam:0": 400,
            "udp://@:5000": 400,
            "file:///etc/passwd": 400,
        }
        for source, status in refused.items():
            response = serving.client.post("/v1/jobs", json={"source": source})
            assert response.status_code == status, (source, response.text)
            assert "error" in response.json()
        assert list((tmp_path / "spool" / "jobs").iterdir()) == []
        response = serving.client.post("/v1/jobs", json={"source": "clip.mp4"})
        assert response.status_code == 202, response.text
        assert response.json()["source"] == {"kind": "file", "path": "clip.mp4"}
        # It reads the file: its frames counted, the first ones written (the rest of the run is
        # the upload's, tested above).
        job, _ = serving.wait(response.json()["id"], lambda j: j["progress"]["frames_done"], "")
        assert job["state"] == "running" and job["progress"]["frames_total"] == frames
    finally:
        serving.close()


def test_requests_a_job_refuses(serving: Serving, clip):
    path, _ = clip
    client = serving.client
    # No source folder: a server-side path is not for requests.
    assert client.post("/v1/jobs", json={"source": "clip.mp4"}).status_code == 403
    text = client.post(
        "/v1/jobs", content=b'{"source": "x"}', headers={"content-type": "text/plain"}
    )
    assert text.status_code == 415
    bad = [
        {"source": 3},
        {"source": "rtsp://cam/1", "sink": "x"},
        {"source": "rtsp://cam/1", "options": {"blend": "strong"}},
        {"source": "rtsp://cam/1", "options": {"model": "GPEN-BFR-2048"}},
    ]
    for body in bad:
        assert client.post("/v1/jobs", json=body).status_code == 400, body
    assert serving.upload(path, blend="x").status_code == 400
    for job_id in ("0123456789abcdef", "XYZ", "..", "0123456789ABCDEF", "%2e%2e%2fjob.json"):
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404, job_id
        assert client.get(f"/v1/jobs/{job_id}/result").status_code == 404, job_id
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 404, job_id
    assert list((serving.service.spool / "jobs").iterdir()) == []


def test_a_job_on_a_file_that_is_no_video_fails_in_one_line(serving: Serving, tmp_path: Path):
    notes = tmp_path / "notes.mp4"
    notes.write_text("not a video\n" * 100)
    response = serving.upload(notes)
    assert response.status_code == 202, response.text
    job, _ = serving.wait(response.json()["id"], finished, "the job")
    assert job["state"] == "failed" and job["result"] is None
    # UserError's line, naming the upload as the client named it, not the spool's path.
    assert job["error"].startswith("not a readable media file: notes.mp4 ("), job["error"]
    assert "\n" not in job["error"] and str(serving.service.spool) not in job["error"]
    assert serving.client.get(f"/v1/jobs/{job['id']}/result").status_code == 409


def test_the_spool_s_quota(enhancer, clip, tmp_path: Path):
    path, _ = clip
    size = path.stat().st_size  # 137 kB
    serving = Serving(enhancer, tmp_path / "spool", spool_quota_bytes=size * 3 // 2)
    try:
        first = serving.upload(path)
        assert first.status_code == 202, first.text
        # The declared size would go over the quota: refused before a byte is read.
        second = serving.upload(path)
        assert second.status_code == 507, second.text
        # A chunked upload declares nothing: cut where it crosses the quota.
        boundary = "jobsboundary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.mp4"\r\n'
            "Content-Type: video/mp4\r\n\r\n"
        ).encode()
        body = head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        chunked = serving.client.post(
            "/v1/jobs",
            content=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
        assert chunked.status_code == 507, chunked.text
        first_id = first.json()["id"]
        assert [p.name for p in (serving.service.spool / "jobs").iterdir()] == [first_id]
    finally:
        serving.close()


def test_jobs_queued_or_running_are_limited(enhancer, tmp_path: Path):
    serving = Serving(enhancer, tmp_path / "spool", max_jobs=1)
    try:
        job = serving.upload(SAMPLE).json()  # ~20 s of work
        busy = serving.client.post("/v1/jobs", json={"source": "rtsp://127.0.0.1:9/x"})
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) > 0
        assert serving.upload(SAMPLE).status_code == 503
        assert serving.client.delete(f"/v1/jobs/{job['id']}").json()["state"] == "canceled"
        assert [p.name for p in (serving.service.spool / "jobs").iterdir()] == [job["id"]]
    finally:
        serving.close()


def test_a_live_source_is_refused_as_a_job_and_the_queue_goes_on(serving: Serving, clip):
    """A camera's URL would hold the one runner for ever: the job fails in one line, and the job
    queued behind it runs."""
    from rtsp_server import RtspServer

    path, frames = clip
    with RtspServer(path) as rtsp:
        live = serving.client.post("/v1/jobs", json={"source": rtsp.url})
        assert live.status_code == 202, live.text
        behind = serving.upload(path)
        job, _ = serving.wait(live.json()["id"], finished, "the live job")
    assert job["state"] == "failed"
    assert job["error"] == "the source is live: start it as a stream (POST /v1/streams)"
    job, _ = serving.wait(behind.json()["id"], finished, "the job behind it")
    assert job["state"] == "succeeded" and job["progress"]["frames_done"] == frames
