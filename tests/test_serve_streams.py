"""Live streams of ``streamgpen serve``: a real RTSP server's stream enhanced into a recording and
the preview (seen in headless Chromium), stopped by DELETE; the requests a stream refuses.

The service runs the identity model with the mobilenet detector on the CPU, behind the real app
(``service.app.build_app``) on a real HTTP server; ffprobe reads the recording independently.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from browser import APT_PACKAGES, BrowserError, HeadlessChromium, find_chromium
from probe import ffprobe
from rtsp_server import RtspServer, free_port

from streamgpen.config import (
    DetectorConfig,
    EnhancerConfig,
    FaceConfig,
    ModelConfig,
    RunConfig,
    SinkConfig,
    SourceConfig,
    VideoConfig,
)
from streamgpen.enhancer import Enhancer
from streamgpen.service.app import build_app
from streamgpen.service.core import Service, ServiceLimits
from streamgpen.web.server import HttpServer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "solvay_pan.mp4"
TOKEN = "streams-test-token"
COOKIE = "streamgpen_streams_test"
TIMEOUT_S = 30.0


def half_size_clip(path: Path) -> Path:
    """The sample at 480x270, a key frame a second and no B-frames (the RTSP server sends the
    H.264 as it is, looped): a quarter of the pixels to detect in keeps the CPU run near the
    source's 25 fps, so the stream's figures and the preview move within a second."""
    with av.open(str(SAMPLE)) as src:
        frames = [f.reformat(width=480, height=270, format="yuv420p") for f in src.decode(video=0)]
    with av.open(str(path), "w") as dst:
        stream = dst.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 480, 270, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": "25", "bf": "0"}
        for index, frame in enumerate(frames):
            # Timestamps of its own: the server paces by them (without, it sends a burst).
            frame.pts, frame.time_base = index, Fraction(1, 25)
            dst.mux(stream.encode(frame))
        dst.mux(stream.encode(None))
    return path


def base_config(weights_dir: Path, *, reconnect: int | None) -> RunConfig:
    enhancer = EnhancerConfig(
        model=ModelConfig(name="identity"),
        detector=DetectorConfig(name="retinaface_mobile0.25"),
        faces=FaceConfig(mask="box", only_center_face=True),
        device="cpu",
        weights_dir=weights_dir,
    )
    video = VideoConfig(
        source=SourceConfig(reconnect=reconnect, timeout=5.0),
        sink=SinkConfig(preset="ultrafast"),
    )
    return RunConfig(input="", enhancer=enhancer, video=video)


class Serving:
    """A started service behind its app on a real HTTP server, and a client with the token."""

    def __init__(self, service: Service):
        self.service = service
        self.server = HttpServer(build_app(service, cookie_name=COOKIE), "127.0.0.1").start()
        self.client = httpx.Client(
            base_url=self.server.url(""),
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=TIMEOUT_S,
        )

    def close(self) -> None:
        self.client.close()
        self.server.stop()
        self.service.close()

    def streams_gauge(self) -> float:
        return self.service.metrics.registry.get_sample_value("streamgpen_streams")


@pytest.fixture
def serving(weights_dir: Path, tmp_path: Path) -> Iterator[Serving]:
    config = base_config(weights_dir, reconnect=0)
    enhancer = Enhancer.from_config(config.enhancer, progress=False)
    service = Service(
        config=config,
        enhancer=enhancer,
        spool=tmp_path / "spool",
        limits=ServiceLimits(max_streams=1),
        token=TOKEN,
    ).start()
    serving = Serving(service)
    try:
        yield serving
    finally:
        serving.close()


def wait_for(condition, what: str, timeout_s: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def pane(shot: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x, y, width, height = box
    assert width > 100 and height > 75, f"the pane is too small: {box}"
    return shot[y + 2 : y + height - 2, x + 2 : x + width - 2].astype(np.float32)


def test_a_live_stream_records_shows_its_preview_and_stops(serving: Serving, tmp_path: Path):
    try:
        find_chromium()
    except BrowserError as error:
        pytest.fail(f"{error} -- the browser test needs the Debian package(s) {APT_PACKAGES}")
    client = serving.client
    with (
        RtspServer(half_size_clip(tmp_path / "clip.mp4")) as rtsp,
        HeadlessChromium(width=1280, height=600, timeout_s=TIMEOUT_S) as browser,
    ):
        body = {"source": rtsp.url, "sink": "file", "preview": True, "options": {"blend": 0.5}}
        created = client.post("/v1/streams", json=body)
        assert created.status_code == 201, created.text
        stream = created.json()
        url = f"/v1/streams/{stream['id']}"
        assert created.headers["location"] == url
        assert stream["state"] in ("starting", "running") and stream["preview"] == f"{url}/preview/"
        assert serving.streams_gauge() == 1
        first = wait_for(lambda: running_with_frames(client, url), "the stream's first frames")
        # Another stream is one over max_streams=1.
        refused = client.post("/v1/streams", json=body)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
        show_the_preview(browser, serving.server.url(f"{url}/preview/?token={TOKEN}"))
        assert_the_page_sets_the_token_cookie(serving, f"{url}/preview/")
        assert_gets_change_nothing(client, url, first["frames"])
        stopped = client.delete(url)
    assert stopped.status_code == 200, stopped.text
    final = stopped.json()
    assert final["state"] == "stopped" and final["error"] is None, final
    assert final["preview"] is None and final["recording"] == f"{url}/recording"
    assert serving.streams_gauge() == 0
    assert_the_recording_plays(serving, url, final)


def running_with_frames(client: httpx.Client, url: str) -> dict | None:
    stream = client.get(url).json()
    return stream if stream["state"] == "running" and stream["frames"] >= 5 else None


def show_the_preview(browser: HeadlessChromium, page: str) -> None:
    """The stream's live page shows a decoded enhanced (and original) picture that moves."""
    browser.navigate(page)
    browser.wait_for(
        "['original', 'enhanced'].every(id => document.getElementById(id).naturalWidth > 0)"
    )
    browser.wait_for("document.getElementById('stats').textContent.includes('identity')")
    boxes = {name: browser.element_box(f"#{name}") for name in ("original", "enhanced")}
    shots = [browser.screenshot()]
    time.sleep(1.0)
    shots.append(browser.screenshot())
    for name, box in boxes.items():
        a, b = pane(shots[0], box), pane(shots[1], box)
        assert a.std() > 20 and b.std() > 20, f"the {name} pane is blank"
        assert np.abs(a - b).mean() > 1, f"the {name} pane did not move in a second"
    assert browser.element_text("#status") == ""


def assert_the_page_sets_the_token_cookie(serving: Serving, page: str) -> None:
    """The page opened with ``?token=`` (as a browser opens the printed URL) gets the cookie
    the app's TokenGuard takes, so the page's own requests need no token in their URLs."""
    opened = httpx.get(serving.server.url(page, token=TOKEN))
    cookie = opened.headers.get("set-cookie", "")
    assert opened.status_code == 200 and cookie.startswith(f"{COOKIE}={TOKEN};"), cookie
    with httpx.Client(base_url=serving.server.url(""), cookies={COOKIE: TOKEN}) as by_cookie:
        assert by_cookie.get(f"{page}stats").json()["published"] > 0
    assert httpx.get(serving.server.url(f"{page}stats")).status_code == 401


def assert_gets_change_nothing(client: httpx.Client, url: str, frames: int) -> None:
    """Reading the figures (and asking for the recording too early) stops and starts nothing."""
    assert client.get(f"{url}/recording").status_code == 409
    listed = client.get("/v1/streams", params={"source": "rtsp://127.0.0.1:1/x"}).json()
    assert [s["id"] for s in listed["streams"]] == [url.rsplit("/", 1)[1]]
    later = wait_for(lambda: advanced(client, url, frames), "the frames to grow")
    assert later["state"] == "running"
    assert later["fps_in"] > 0 and later["fps_out"] > 0
    assert 0 < later["latency_ms_p50"] <= later["latency_ms_p95"]
    # --only-center-face: the one face nearest the centre of the group photo's pan.
    assert later["reconnects"] == 0 and later["faces"] == 1


def advanced(client: httpx.Client, url: str, frames: int) -> dict | None:
    stream = client.get(url).json()
    return stream if stream["frames"] > frames else None


def assert_the_recording_plays(serving: Serving, url: str, final: dict) -> None:
    recording = serving.service.spool / "streams" / final["id"] / "output.mp4"
    decoded = ffprobe(recording, "v:0", "frame=pts_time")
    assert len(decoded) == final["frames"] > 0, (len(decoded), final)
    pts = np.float64(decoded)
    assert np.all(np.diff(pts) > 0)
    downloaded = serving.client.get(f"{url}/recording")
    assert downloaded.status_code == 200
    assert downloaded.headers["content-type"] == "video/mp4"
    assert downloaded.content == recording.read_bytes()


REFUSED = [
    ({"source": "clip.mp4", "sink": "file"}, "the service connects to"),
    ({"source": "/etc/passwd", "preview": True}, "the service connects to"),
    ({"source": "file:///etc/passwd", "preview": True}, "the service connects to"),
    ({"source": "webcam:/dev/sda", "preview": True}, "the service connects to"),
    # libavformat would listen on a port for these: a request must not open one.
    ({"source": "tcp://0.0.0.0:9000?listen=1", "preview": True}, "the service connects to"),
    ({"source": "srt://0.0.0.0:9000?mode=listener", "preview": True}, "the service connects to"),
    ({"source": "rtsp://cam/a b", "preview": True}, "not a URL"),
    ({"source": 42, "preview": True}, "non-empty string"),
    ({"preview": True}, "non-empty string"),
    ({"source": "rtsp://127.0.0.1:1/x", "sink": "/tmp/out.mp4"}, "sink"),
    ({"source": "rtsp://127.0.0.1:1/x", "sink": "null"}, "sink"),
    ({"source": "rtsp://127.0.0.1:1/x", "sink": "http://127.0.0.1:1/x"}, "sink"),
    ({"source": "rtsp://127.0.0.1:1/x"}, "a sink, a preview or both"),
    ({"source": "rtsp://127.0.0.1:1/x", "sink": None, "preview": False}, "a sink, a preview"),
    ({"source": "rtsp://127.0.0.1:1/x", "preview": "yes"}, "preview must be"),
    ({"source": "rtsp://127.0.0.1:1/x", "preview": True, "output": "/tmp/x"}, "unknown field"),
    ({"source": "rtsp://127.0.0.1:1/x", "preview": True, "options": {"blend": 2}}, "blend"),
    ({"source": "rtsp://127.0.0.1:1/x", "preview": True, "options": {"model": "x"}}, "unknown"),
    (["rtsp://127.0.0.1:1/x"], "JSON object"),
]


def test_a_bad_stream_request_is_a_400(serving: Serving):
    for body, reason in REFUSED:
        response = serving.client.post("/v1/streams", json=body)
        assert response.status_code == 400, (body, response.text)
        assert reason in response.json()["error"], (body, response.text)
    assert serving.client.get("/v1/streams").json() == {"streams": []}
    assert list((serving.service.spool / "streams").iterdir()) == []


def test_control_takes_json_only_and_unknown_streams_are_404(serving: Serving):
    client = serving.client
    form = client.post("/v1/streams", data={"source": "rtsp://127.0.0.1:1/x", "preview": "1"})
    assert form.status_code == 415
    assert client.get("/v1/streams", params={"source": "rtsp://127.0.0.1:1/x"}).status_code == 200
    assert client.get("/v1/streams").json() == {"streams": []}
    for stream_id in ("0123456789abcdef", "ABCDEF0123456789", "..", "x" * 300):
        for path in ("", "/recording", "/preview/", "/preview/stats"):
            assert client.get(f"/v1/streams/{stream_id}{path}").status_code == 404, path
        assert client.delete(f"/v1/streams/{stream_id}").status_code == 404
    assert client.put("/v1/streams/0123456789abcdef").status_code == 405


def test_an_unreachable_source_fails_with_one_line(serving: Serving):
    client = serving.client
    port = free_port()
    source, shown = (f"rtsp://cam:{word}@127.0.0.1:{port}/nothing" for word in ("secret", "***"))
    created = client.post("/v1/streams", json={"source": source, "preview": True})
    assert created.status_code == 201, created.text
    assert created.json()["source"] == shown, "a listing never shows the password"
    url = created.headers["location"]
    failed = wait_for(lambda: ended(client, url), "the stream to fail")
    assert failed["state"] == "failed" and failed["frames"] == 0
    assert failed["error"].startswith(f"cannot open {shown}: "), failed["error"]
    assert "\n" not in failed["error"] and "secret" not in failed["error"]
    assert failed["preview"] is None and failed["recording"] is None
    assert client.get(f"{url}/preview/").status_code == 404
    assert serving.streams_gauge() == 0
    # DELETE of an ended stream removes it.
    assert client.delete(url).status_code == 204
    assert client.get(url).status_code == 404
    assert client.get("/v1/streams").json() == {"streams": []}


def ended(client: httpx.Client, url: str) -> dict | None:
    stream = client.get(url).json()
    return stream if stream["state"] in ("stopped", "failed") else None


def test_a_stream_published_over_rtsp_and_stopped_by_close(serving: Serving, tmp_path: Path):
    client = serving.client
    clip = half_size_clip(tmp_path / "clip.mp4")
    with RtspServer(clip, record_dir=tmp_path / "published") as rtsp:
        body = {"source": rtsp.url, "sink": rtsp.publish_url}
        created = client.post("/v1/streams", json=body)
        assert created.status_code == 201, created.text
        url = created.headers["location"]
        assert created.json()["preview"] is None and created.json()["recording"] is None
        wait_for(lambda: running_with_frames(client, url), "the stream's first frames")
        serving.service.streams.close()  # what Service.close() does first
        final = client.get(url).json()
        assert final["state"] == "stopped" and final["error"] is None, final
        assert serving.streams_gauge() == 0
        refused = client.post("/v1/streams", json=body)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
        published = wait_for(settled_recording(rtsp), "the published recording")
    assert len(ffprobe(published, "v:0", "frame=pts_time")) == final["frames"], final


def settled_recording(rtsp: RtspServer, quiet_s: float = 0.5):
    """A condition: the server's recording, once it has not grown for ``quiet_s`` (the server
    writes the packets as they come; the last one can be half-written when first seen)."""
    seen = {"size": -1, "since": time.monotonic()}

    def condition() -> Path | None:
        recordings = rtsp.recordings()
        size = recordings[0].stat().st_size if recordings else -1
        if size != seen["size"]:
            seen.update(size=size, since=time.monotonic())
        settled = size > 0 and time.monotonic() - seen["since"] >= quiet_s
        return recordings[0] if settled else None

    return condition


def test_a_stream_takes_turns_on_the_device(serving: Serving, tmp_path: Path):
    """While someone else holds the service's device (an image batch), the stream's worker
    waits: once the chunk it was restoring is out, no frame comes out until the lock is free."""
    client = serving.client
    with RtspServer(half_size_clip(tmp_path / "clip.mp4")) as rtsp:
        created = client.post("/v1/streams", json={"source": rtsp.url, "preview": True})
        url = created.headers["location"]
        wait_for(lambda: running_with_frames(client, url), "the stream's first frames")
        with serving.service.device_lock:
            # A live chunk is 2 frames, restored in ~0.4 s here (4-6 frames a second).
            time.sleep(1.5)
            held = client.get(url).json()["frames"]
            time.sleep(1.5)
            during = client.get(url).json()["frames"] - held
        after = wait_for(lambda: advanced(client, url, held + during), "the frames to go on")
        client.delete(url)
    # Measured: 0 with the lock passed down to the engine; 4-8 frames in such a window when the
    # engine was given the torch device instead of the lock (pipeline/build.py).
    assert during == 0, f"{during} frames came out while the device was held"
    assert after["state"] == "running"
