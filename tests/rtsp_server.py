"""A real RTSP server for the tests: GStreamer's gst-rtsp-server on 127.0.0.1.

``RtspServer`` runs ``tests/gst_rtsp_serve.py`` with Debian's system python
(``/usr/bin/python3``, which imports Debian's ``gi``) in its own process group. The server
streams a video file's H.264 video (and AAC audio, if any) without re-encoding, at real-time
pace, looped forever with continuous timestamps; every client starts at the first frame.
``stop()`` kills the server mid-stream (readers see EOF / an error), ``start()`` brings it back
on the same port and path, so reconnection logic can be tested. With ``record_dir`` it also
accepts publishers (ANNOUNCE/RECORD, e.g. PyAV ``format="rtsp"``) on ``publish_url`` (H.264
only) and ``publish_av_url`` (H.264 + AAC) and writes each publication as MPEG-TS
``record_dir/record-N.ts``. A publisher's announced streams must match the mount.

Debian packages it needs (see ``APT_PACKAGES``); without them ``start()`` raises
``RtspServerError``, so a test using it fails rather than skips.

Example::

    with RtspServer(make_test_clip(tmp_path / "clip.mp4")) as server:
        container = av.open(server.url, options={"rtsp_transport": "tcp"}, timeout=(5, 5))
        ...
        server.restart()
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"
SYSTEM_PYTHON = "/usr/bin/python3"
SERVE_SCRIPT = Path(__file__).resolve().with_name("gst_rtsp_serve.py")
APT_PACKAGES = (
    "python3-gi",
    "gir1.2-gst-rtsp-server-1.0",
    "gstreamer1.0-plugins-base",
    "gstreamer1.0-plugins-good",
    "gstreamer1.0-plugins-bad",
)
APT_HINT = "apt-get install -y --no-install-recommends " + " ".join(APT_PACKAGES)


class RtspServerError(RuntimeError):
    """The RTSP test server could not be started (packages missing, bad file, timeout...)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def rtsp_describe(url: str, timeout: float = 2.0) -> str:
    """Send one RTSP DESCRIBE for ``url`` (rtsp://127.0.0.1:PORT/path); return the status line."""
    rest = url.split("://", 1)[1]
    hostport = rest.split("/", 1)[0]
    host, _, port = hostport.partition(":")
    request = f"DESCRIBE {url} RTSP/1.0\r\nCSeq: 1\r\nAccept: application/sdp\r\n\r\n"
    with socket.create_connection((host, int(port or 554)), timeout=timeout) as sock:
        sock.sendall(request.encode())
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.split(b"\r\n", 1)[0].decode(errors="replace")


class RtspServer:
    """A looping RTSP server for ``video`` on ``rtsp://127.0.0.1:PORT/PATH``.

    ``port`` defaults to a free port, picked once: ``restart()`` keeps it, as it keeps
    ``path``. ``start()`` returns once the server answers a DESCRIBE for ``url`` with 200.
    """

    def __init__(
        self,
        video: str | os.PathLike[str],
        port: int | None = None,
        path: str = "/live",
        *,
        record_dir: str | os.PathLike[str] | None = None,
        record_path: str = "/publish",
        startup_timeout: float = 20.0,
    ) -> None:
        self.video = Path(video)
        self.port = port if port is not None else free_port()
        self.path = path if path.startswith("/") else "/" + path
        self.record_dir = Path(record_dir) if record_dir is not None else None
        self.record_path = record_path if record_path.startswith("/") else "/" + record_path
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: tempfile._TemporaryFileWrapper[bytes] | None = None

    @property
    def url(self) -> str:
        """Where readers connect: ``rtsp://127.0.0.1:PORT/PATH``."""
        return f"rtsp://{HOST}:{self.port}{self.path}"

    @property
    def publish_url(self) -> str:
        """Where a publisher of H.264 video only connects (only with ``record_dir``)."""
        return f"rtsp://{HOST}:{self.port}{self.record_path}"

    @property
    def publish_av_url(self) -> str:
        """Where a publisher of H.264 video + AAC audio connects (only with ``record_dir``)."""
        return f"rtsp://{HOST}:{self.port}{self.record_path}_av"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def recordings(self) -> list[Path]:
        """The MPEG-TS files written for publications so far, oldest first."""
        if self.record_dir is None:
            return []
        files = self.record_dir.glob("record-*.ts")
        return sorted(files, key=lambda p: int(p.stem.split("-")[1]))

    def start(self) -> RtspServer:
        """Start the server and wait until it serves ``url``; raise RtspServerError if not."""
        if self.running:
            return self
        if not Path(SYSTEM_PYTHON).exists():
            raise RtspServerError(f"{SYSTEM_PYTHON} is missing; the RTSP tests need: {APT_HINT}")
        if not self.video.is_file():
            raise RtspServerError(f"no such video file: {self.video}")
        cmd = [SYSTEM_PYTHON, str(SERVE_SCRIPT), str(self.video), "--port", str(self.port)]
        cmd += ["--path", self.path]
        if self.record_dir is not None:
            self.record_dir.mkdir(parents=True, exist_ok=True)
            cmd += ["--record-path", self.record_path, "--record-dir", str(self.record_dir)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        self._log = tempfile.NamedTemporaryFile(prefix="rtsp-server-", suffix=".log")  # noqa: SIM115
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group: stop() kills all of it
        )
        deadline = time.monotonic() + self.startup_timeout
        last_error = "no answer"
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                log = self.log_text()
                self._cleanup()
                hint = f"\nThe RTSP tests need: {APT_HINT}" if code == 3 else ""
                raise RtspServerError(
                    f"RTSP server exited with status {code} before serving {self.url}:\n"
                    f"{log.strip()}{hint}"
                )
            try:
                status = rtsp_describe(self.url, timeout=2.0)
                if " 200 " in status + " ":
                    return self
                last_error = status
            except OSError as exc:
                last_error = repr(exc)
            if time.monotonic() > deadline:
                log = self.log_text()
                self.stop()
                raise RtspServerError(
                    f"RTSP server did not serve {self.url} within {self.startup_timeout}s "
                    f"(last: {last_error}):\n{log.strip()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 3.0) -> None:
        """Kill the server's process group (SIGTERM, then SIGKILL) and wait until it is gone."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
                os.killpg(proc.pid, signal.SIGCONT)  # in case it was frozen
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Anything left in the group (there should be nothing) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._cleanup()

    def freeze(self) -> None:
        """SIGSTOP the server: connections stay open but nothing flows (a hung peer)."""
        if self._proc is None:
            raise RtspServerError("the RTSP server is not running")
        os.killpg(self._proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT the server after ``freeze()``."""
        if self._proc is None:
            raise RtspServerError("the RTSP server is not running")
        os.killpg(self._proc.pid, signal.SIGCONT)

    def restart(self) -> RtspServer:
        """``stop()`` then ``start()``, on the same port and path."""
        self.stop()
        return self.start()

    def log_text(self) -> str:
        """What the server process printed so far (empty once stopped)."""
        if self._log is None:
            return ""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def _cleanup(self) -> None:
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> RtspServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()


def make_test_clip(
    path: str | os.PathLike[str],
    seconds: float = 4.0,
    fps: int = 25,
    size: tuple[int, int] = (640, 360),
    audio: bool = True,
) -> Path:
    """Write a test clip with PyAV: H.264 (yuv420p, key frame every second) + AAC, in MP4.

    The picture is a moving gradient with the frame number drawn as a white bar at the top
    (``frame_index_of`` reads it back); the audio is a 440 Hz tone.
    """
    import av

    path = Path(path)
    width, height = size
    n_frames = round(seconds * fps)
    with av.open(str(path), "w") as container:
        vstream = container.add_stream("libx264", rate=fps)
        vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
        vstream.options = {"preset": "ultrafast", "g": str(fps), "bf": "0"}
        astream = None
        if audio:
            astream = container.add_stream("aac", rate=48000)
            astream.layout = "stereo"
        xs = np.arange(width, dtype=np.int32)[None, :]
        ys = np.arange(height, dtype=np.int32)[:, None]
        for i in range(n_frames):
            img = np.empty((height, width, 3), np.uint8)
            img[..., 0] = (xs + 4 * i) % 256
            img[..., 1] = (ys + 2 * i) % 256
            img[..., 2] = (xs + ys + 8 * i) % 256
            _draw_frame_index(img, i)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            container.mux(vstream.encode(frame))
        if astream is not None:
            rate, chunk = 48000, 1024
            for start in range(0, int(seconds * rate), chunk):
                t = (np.arange(chunk) + start) / rate
                tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
                pcm = np.stack([tone, tone])
                aframe = av.AudioFrame.from_ndarray(pcm, format="fltp", layout="stereo")
                aframe.sample_rate = rate
                aframe.pts = start
                container.mux(astream.encode(aframe))
            container.mux(astream.encode(None))
        container.mux(vstream.encode(None))
    return path


_BAR_HEIGHT = 16


def _draw_frame_index(img: np.ndarray, index: int) -> None:
    """Draw ``index`` as 8 black/white 40-px cells (binary, MSB first) in the top bar."""
    img[:_BAR_HEIGHT] = 0
    for bit in range(8):
        if index >> (7 - bit) & 1:
            img[:_BAR_HEIGHT, bit * 40 + 4 : bit * 40 + 36] = 255


def frame_index_of(rgb: np.ndarray) -> int:
    """The frame number (mod 256) drawn by ``make_test_clip`` into an RGB frame."""
    bar = rgb[2 : _BAR_HEIGHT - 2].mean(axis=(0, 2))
    return sum(1 << (7 - bit) for bit in range(8) if bar[bit * 40 + 8 : bit * 40 + 32].mean() > 128)
