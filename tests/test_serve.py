"""``streamgpen serve``'s photos: real HTTP clients on 127.0.0.1, the real detector, identity GPEN.

The service runs in this process (``HttpServer`` on a thread) where a test needs its insides (the
device lock, the metrics), and as ``python -m streamgpen serve`` where a user's view matters (the
command line, the process's memory under a 2 GB upload, a token).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import torch

from streamgpen.config import DetectorName, EnhancerConfig, RunConfig
from streamgpen.enhancer import Enhancer
from streamgpen.runtime.restorer import Identity, Restorer
from streamgpen.service.app import build_app
from streamgpen.service.core import Service, ServiceLimits
from streamgpen.web.server import HttpServer

MiB = 1 << 20


@pytest.fixture(scope="module")
def photo(shared_dir) -> np.ndarray:
    """A 664x284 BGR part of the Solvay photo: a dozen faces, detected in ~0.1 s on a CPU."""
    image = cv2.imread(str(shared_dir / "media" / "Solvay_conference_1927.png"))
    return np.ascontiguousarray(cv2.resize(image, (664, 284), interpolation=cv2.INTER_AREA))


@pytest.fixture(scope="module")
def enhancer(detector) -> Enhancer:
    return Enhancer(
        restorer=Restorer(Identity(), torch.device("cpu"), batch_size=8),
        face_detector=detector,
        device="cpu",
        mask="box",
    )


def start(
    enhancer: Enhancer, spool: Path, token: str | None = None, **limits
) -> tuple[HttpServer, Service]:
    config = RunConfig(
        input="", enhancer=EnhancerConfig(detector=DetectorName.RETINAFACE_MOBILE, device="cpu")
    )
    service = Service(
        config=config, enhancer=enhancer, spool=spool, limits=ServiceLimits(**limits), token=token
    ).start()
    server = HttpServer(None, "127.0.0.1", 0, option="--port").bind()
    server.app = build_app(service, cookie_name="streamgpen_token_test")
    return server.start(), service


@pytest.fixture
def served(enhancer, tmp_path):
    server, service = start(enhancer, tmp_path / "spool")
    yield server, service
    server.stop()
    service.close()


def png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def decoded(body: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)


def post(url: str, data: bytes, name="a.png", ctype="image/png", **params) -> httpx.Response:
    files = {"file": (name, data, ctype)}
    return httpx.post(url, files=files, params=params, timeout=60)


def test_a_photo_comes_back_the_same_size_with_its_faces(served, photo, enhancer):
    server, _ = served
    response = post(server.url("/v1/enhance"), png(photo))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    out = decoded(response.content)
    assert out.shape == photo.shape
    faces = json.loads(response.headers["x-faces"])
    expected = enhancer.enhance(photo)
    assert len(faces) == len(expected.faces) >= 8
    # The service's paste is the library's, bit for bit; with the identity model the background
    # is the input's, bit for bit, and so are most pixels (the face regions are resampled).
    assert np.array_equal(out, expected.image)
    far = far_from_faces(faces, photo.shape[:2])
    assert far.mean() > 0.3
    assert np.array_equal(out[far], photo[far])
    as_json = post(server.url("/v1/enhance"), png(photo), faces="1").json()
    assert as_json["width"] == photo.shape[1] and as_json["faces"] == faces


def far_from_faces(faces: list[dict], shape: tuple[int, int]) -> np.ndarray:
    """Pixels more than a box's size away from every face box (the paste reaches ~1 box)."""
    near = np.zeros(shape, bool)
    for face in faces:
        x1, y1, x2, y2 = face["box"]
        grow = max(x2 - x1, y2 - y1)
        near[
            max(0, int(y1 - grow)) : int(y2 + grow) + 1, max(0, int(x1 - grow)) : int(x2 + grow) + 1
        ] = True
    return ~near


def test_formats_and_exif_orientation(served, photo):
    server, _ = served
    jpeg = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    response = post(server.url("/v1/enhance"), jpeg, "a.jpg", "image/jpeg")
    assert response.headers["content-type"] == "image/jpeg"
    as_webp = post(server.url("/v1/enhance"), jpeg, "a.jpg", "image/jpeg", format="webp")
    assert as_webp.headers["content-type"] == "image/webp"
    assert decoded(as_webp.content).shape == photo.shape
    # A request's own options: upscale doubles the answer; blend 0 gives the input back.
    doubled = decoded(post(server.url("/v1/enhance"), png(photo), upscale="2").content)
    assert doubled.shape == (2 * photo.shape[0], 2 * photo.shape[1], 3)
    unblended = post(server.url("/v1/enhance"), png(photo), blend="0")
    assert np.array_equal(decoded(unblended.content), photo)
    # EXIF orientation 6 (rotate 90° clockwise to view): the answer is upright, faces found.
    rotated = exif_rotated_jpeg(np.ascontiguousarray(np.rot90(photo, 1)))
    upright = post(server.url("/v1/enhance"), rotated, "r.jpg", "image/jpeg")
    assert decoded(upright.content).shape == photo.shape
    assert len(json.loads(upright.headers["x-faces"])) >= 8


def exif_rotated_jpeg(stored: np.ndarray) -> bytes:
    """A JPEG of ``stored`` pixels whose EXIF says: turn 90° clockwise to view (orientation 6)."""
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(stored[..., ::-1])
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def test_bad_inputs_get_their_statuses(enhancer, tmp_path, photo):
    server, service = start(
        enhancer, tmp_path / "spool", max_image_bytes=MiB, max_image_pixels=100_000
    )
    try:
        url = server.url("/v1/enhance")
        unreadable = post(url, b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
        assert unreadable.status_code == 400 and "error" in unreadable.json()
        assert post(url, b"hello, world", "a.txt", "text/plain").status_code == 415
        too_many_pixels = post(url, png(photo))  # 188,576 px
        assert too_many_pixels.status_code == 413, too_many_pixels.text
        assert "pixels" in too_many_pixels.json()["error"]
        noise = np.random.default_rng(0).integers(0, 255, (1200, 1200, 3), np.uint8)
        assert post(url, png(noise)).status_code == 413  # 4.3 MB of bytes
        not_multipart = httpx.post(
            url, content=png(photo[:50, :50]), headers={"content-type": "image/png"}
        )
        assert not_multipart.status_code == 415
        assert post(url, png(photo[:50, :50]), blend="2").status_code == 400
        assert "at most 4" in post(url, png(photo[:50, :50]), upscale="1e300").json()["error"]
        assert post(url, png(photo[:50, :50]), mask="parse").status_code == 400  # no parser loaded
        unknown = post(url, png(photo[:50, :50]), colour="red")
        assert unknown.status_code == 400 and "colour" in unknown.json()["error"]
        assert httpx.get(url).status_code == 405
        missing = httpx.get(server.url("/nothing"))
        assert missing.status_code == 404 and "error" in missing.json()
        assert not list((service.spool / "uploads").iterdir())  # every upload removed
    finally:
        server.stop()
        service.close()


def test_a_full_queue_answers_503_with_retry_after(enhancer, tmp_path, photo):
    server, service = start(enhancer, tmp_path / "spool", max_queue=1, batch_window_s=0)
    small = png(photo[:64, :64])
    url = server.url("/v1/enhance")
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool, service.device_lock:
            # The device is held: the first request is taken by the worker (which then waits for
            # the device), the second fills the queue, the rest are refused at once. (The lock is
            # released before the pool waits for its requests: ``with`` leaves right to left.)
            first = pool.submit(post, url, small)
            wait_for(lambda: service.batcher.submitted == 1 and service.batcher.queued == 0)
            second = pool.submit(post, url, small)
            wait_for(lambda: service.batcher.queued == 1)
            refused = post(url, small)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert first.result().status_code == second.result().status_code == 200
    finally:
        server.stop()
        service.close()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def one_face_photos(photo_bgr: np.ndarray, enhancer: Enhancer, count: int) -> list[bytes]:
    """``count`` PNGs of 96x96 around single faces of the full-size Solvay photo (~40 px faces)."""
    faces = enhancer.enhance(photo_bgr).faces
    crops = []
    for face in faces:
        cx, cy = (face.box[:2] + face.box[2:]) / 2
        x, y = int(cx) - 48, int(cy) - 48
        if min(x, y) >= 0 and x + 96 <= photo_bgr.shape[1] and y + 96 <= photo_bgr.shape[0]:
            crop = photo_bgr[y : y + 96, x : x + 96]
            if len(enhancer.enhance(crop).faces) == 1:
                crops.append(png(crop))
        if len(crops) == 8:
            break
    assert len(crops) == 8
    return [crops[i % len(crops)] for i in range(count)]


def metric(text: str, name: str) -> float:
    """One unlabelled sample of the Prometheus text exposition."""
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_concurrent_requests_share_device_batches(enhancer, tmp_path, shared_dir):
    full = cv2.imread(str(shared_dir / "media" / "Solvay_conference_1927.png"))
    photos = one_face_photos(full, enhancer, 16)
    # 50 ms window: 16 uploads of ~20 KB from 16 threads arrive within a few ms of each other on
    # loopback; the window only has to outlast that spread.
    server, service = start(enhancer, tmp_path / "spool", batch_window_s=0.05)
    url = server.url("/v1/enhance")
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool, service.device_lock:
            # The device is held until every request is queued, as a busy GPU would have it.
            answers = [pool.submit(post, url, data) for data in photos]
            wait_for(lambda: service.batcher.submitted == 16)
        responses = [a.result() for a in answers]
        text = httpx.get(server.url("/metrics")).text
    finally:
        server.stop()
        service.close()
    expected = {data: enhancer.enhance(decoded(data)).image for data in set(photos)}
    for data, response in zip(photos, responses, strict=True):
        assert response.status_code == 200
        assert np.array_equal(decoded(response.content), expected[data])  # each its own, unmixed
    batches = metric(text, "streamgpen_device_batches_total")
    faces = metric(text, "streamgpen_faces_total")
    assert faces == 16
    # 16 faces in batches of 8: 2 batches, against 16 for a request at a time (4 allowed for
    # the round boundary the worker may cut when it takes the first request alone).
    assert batches <= 4 < 16
    assert metric(text, "streamgpen_faces_per_batch_count") == batches
    assert 'streamgpen_requests_total{route="/v1/enhance",status="200"} 16.0' in text


def serve_cli(tmp_path: Path, weights_dir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """``python -m streamgpen serve`` on a free port; returns the process and its base URL."""
    cmd = [sys.executable, "-m", "streamgpen", "serve", "--port", "0", "--model", "identity"]
    cmd += ["--detector", "retinaface_mobile0.25", "--weights-dir", str(weights_dir)]
    cmd += ["--device", "cpu", "--mask", "box", "--spool", str(tmp_path / "spool"), *args]
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        match = re.search(r"serving on (http://\S+?)/?(\?| |$)", line)
        if match:
            return process, match.group(1)
    process.wait(timeout=10)
    raise AssertionError("serve did not start:\n" + "".join(lines))


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory, weights_dir):
    """One ``streamgpen serve`` (photos up to 16 MiB) for the tests of a user's view: its start
    (~20 s on a loaded 2-core machine: torch's import) is paid once."""
    spool_parent = tmp_path_factory.mktemp("cli")
    process, base = serve_cli(spool_parent, weights_dir, "--max-image-mb", "16", "-q")
    yield process, base, spool_parent / "spool"
    process.terminate()
    assert process.wait(timeout=30) == 0  # SIGTERM: a clean stop


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def test_a_2gb_upload_is_refused_at_the_limit(cli_server, photo):
    process, base, spool = cli_server
    post(f"{base}/v1/enhance", png(photo))  # the first request's imports and allocations
    before = rss_bytes(process.pid)
    # Declared: refused before a byte of the body is read (a raw socket: httpx will not
    # declare more than it sends).
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = (
            "POST /v1/enhance HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Length: {2 << 30}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n\r\n"
        )
        sock.sendall(head.encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
    # Chunked, no length: cut where it crosses 16 MiB. The server answers 413 and closes;
    # the client, still sending, may see the connection end instead.
    sent = 0

    def body():
        nonlocal sent
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        chunk = b"\0" * MiB
        while sent < 2 << 30:
            sent += len(chunk)
            yield chunk

    try:
        chunked = httpx.post(
            f"{base}/v1/enhance",
            content=body(),
            headers={"content-type": "multipart/form-data; boundary=x"},
            timeout=60,
        )
        assert chunked.status_code == 413
    except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError):
        pass
    assert sent < 1 << 30  # stopped long before 2 GB
    growth = rss_bytes(process.pid) - before
    assert growth < 16 * MiB, f"the server grew by {growth / MiB:.1f} MiB"
    assert not list((spool / "uploads").iterdir())
    assert httpx.get(f"{base}/healthz").json()["status"] == "ok"


def test_a_token_guards_every_endpoint(enhancer, tmp_path):
    server, service = start(enhancer, tmp_path / "spool", token="s3cret-token")
    base = server.url("").rstrip("/")
    try:
        paths = httpx.get(f"{base}/openapi.json", headers=bearer("s3cret-token")).json()["paths"]
        assert {"/v1/enhance", "/v1/jobs", "/v1/streams", "/metrics"} <= set(paths)
        for path, methods in paths.items():
            concrete = path.replace("{id}", "0" * 16)
            for method in methods:
                for headers in ({}, bearer("wrong")):
                    response = httpx.request(method, base + concrete, headers=headers)
                    assert response.status_code == 401, (method, path)
                    assert response.headers["www-authenticate"] == "Bearer"
        for path in ("/docs", "/openapi.json", "/v1/streams/" + "0" * 16 + "/preview/"):
            assert httpx.get(base + path).status_code == 401
        assert httpx.get(f"{base}/docs", headers=bearer("s3cret-token")).status_code == 200
        # A browser opens /docs?token=...: the cookie it gets lets the page fetch its schema.
        with httpx.Client(base_url=base) as browser:
            assert browser.get("/docs", params={"token": "s3cret-token"}).status_code == 200
            assert browser.get("/openapi.json").status_code == 200
        assert httpx.get(f"{base}/metrics", headers=bearer("s3cret-token")).status_code == 200
        by_query = post(
            f"{base}/v1/enhance", png(np.zeros((32, 32, 3), np.uint8)), token="s3cret-token"
        )
        assert by_query.status_code == 200, by_query.text  # the token is not an option
    finally:
        server.stop()
        service.close()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_serve_refuses_in_one_line(cli_server):
    """A port in use and a bad token: one line on stderr, exit 2, before the models load."""
    _, base, _ = cli_server
    port = base.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "streamgpen", "serve", "--port", port, "--model", "identity"]
    taken = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert taken.returncode == 2  # a user error (UserError.exit_code)
    assert taken.stderr.strip() == f"streamgpen: error: --port 127.0.0.1:{port}: port in use"
    bad = subprocess.run(
        [sys.executable, "-m", "streamgpen", "serve", "--token", "a b"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def readme_client_example() -> str:
    """The README's httpx example (its one Python block that imports httpx)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "import httpx" in b]
    assert len(blocks) == 1
    return blocks[0]


def write_clip(path: Path, photo: np.ndarray, frames: int) -> None:
    """A few frames of ``photo`` panning, as H.264 (the client's upload)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width = photo.shape[0] // 2 * 2, photo.shape[1] // 2 * 2
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            rgb = np.roll(photo, 4 * i, axis=1)[: stream.height, : stream.width, ::-1]
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_the_readme_client_example_runs_against_a_live_server(cli_server, tmp_path, photo):
    _, base, _ = cli_server
    cv2.imwrite(str(tmp_path / "photo.jpg"), photo)
    write_clip(tmp_path / "clip.mp4", photo, frames=8)
    script = readme_client_example().replace("http://127.0.0.1:8000", base)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    faces, job = result.stdout.splitlines()
    assert int(faces.split()[0]) >= 8 and job == "succeeded 8 frames"
    assert cv2.imread(str(tmp_path / "photo_enhanced.jpg")).shape == photo.shape
    assert (tmp_path / "clip_enhanced.mp4").stat().st_size > 1000


def test_a_request_whose_client_left_is_skipped_and_the_worker_goes_on(enhancer, tmp_path, photo):
    from streamgpen.service.batcher import ImageRequest

    server, service = start(enhancer, tmp_path / "spool", batch_window_s=0)
    small = np.ascontiguousarray(photo[:96, :96])
    batcher = service.batcher
    try:
        with service.device_lock:
            first = batcher.submit(ImageRequest(bgr=small, enhancer=enhancer))
            wait_for(lambda: batcher.queued == 0)  # taken; the worker waits for the device
            gone = batcher.submit(ImageRequest(bgr=small, enhancer=enhancer))
            assert gone.cancel()  # as the server does when a client disconnects
            left = batcher.submit(ImageRequest(bgr=small, enhancer=enhancer))
            assert left.cancel()
        assert first.result(timeout=30).bgr.shape == small.shape
        wait_for(lambda: batcher.queued == 0)
        after = batcher.submit(ImageRequest(bgr=small, enhancer=enhancer))
        assert after.result(timeout=30).bgr.shape == small.shape  # the worker is alive
    finally:
        server.stop()
        service.close()  # raises nothing


def test_the_device_lock_is_granted_in_the_order_asked():
    """A video job asks again right after each chunk; a photo that asked meanwhile goes first
    (measured with threading.Lock: photos waited 7-9 s behind a job's ~2 s chunks)."""
    from streamgpen.service.core import FairLock

    lock, order = FairLock(), []

    def take(name: str) -> None:
        with lock:
            order.append(name)

    with lock:
        waiters = []
        for name in "abcd":
            waiters.append(threading.Thread(target=take, args=(name,)))
            waiters[-1].start()
            wait_for(lambda n=len(waiters): lock._issued == n + 1)  # asked, in this order
        assert lock.locked()
    for waiter in waiters:
        waiter.join(timeout=5)
    assert order == list("abcd") and not lock.locked()
