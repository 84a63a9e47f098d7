"""Headless Chromium driven over the DevTools protocol, for tests that look at a live page.

``HeadlessChromium`` starts Debian's ``chromium`` with a throw-away profile and a DevTools port
on 127.0.0.1, attaches to its page with a minimal stdlib WebSocket client and offers the few
commands the tests need: ``navigate``, ``evaluate``, ``wait_for`` and ``screenshot`` (an RGB
array). Live content (MJPEG streams, polling) keeps running between calls, so two screenshots a
second apart show two different moments.

Debian packages it needs: ``APT_PACKAGES``. Without them ``start()`` raises ``BrowserError``, so a
test using it fails rather than skips.

Example::

    with HeadlessChromium() as browser:
        browser.navigate("http://127.0.0.1:8765/")
        browser.wait_for("document.images[0].naturalWidth > 0")
        rgb = browser.screenshot()
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import cv2
import numpy as np
from sockreader import SocketReader

APT_PACKAGES = ("chromium",)
CANDIDATES = ("chromium", "chromium-browser")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    # Containers often have a 64 MiB /dev/shm, too small for Chromium's shared memory.
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


class BrowserError(RuntimeError):
    """Chromium is missing, did not start, or a DevTools command failed."""


def find_chromium() -> str:
    """The Chromium executable; raises ``BrowserError`` naming the Debian packages if none."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise BrowserError(
        f"no Chromium found (looked for {', '.join(CANDIDATES)}): "
        f"apt-get install {' '.join(APT_PACKAGES)}"
    )


class HeadlessChromium:
    """A headless Chromium with one page, driven over DevTools; a context manager."""

    def __init__(self, width: int = 1280, height: int = 720, timeout_s: float = 30.0):
        self.width = width
        self.height = height
        self.timeout_s = timeout_s
        self._process: subprocess.Popen | None = None
        self._profile: Path | None = None
        self._socket: _WebSocket | None = None
        self._next_id = 0

    def start(self) -> HeadlessChromium:
        """Launch Chromium and attach to its page; nothing is left running if that fails."""
        if self._process is not None:
            raise BrowserError("the browser is already started")
        executable = find_chromium()
        try:
            self._launch(executable)
        except BaseException:
            self.close()
            raise
        return self

    def _launch(self, executable: str) -> None:
        self._profile = Path(tempfile.mkdtemp(prefix="streamgpen-chromium-"))
        command = [
            executable,
            *FLAGS,
            f"--user-data-dir={self._profile}",
            f"--window-size={self.width},{self.height}",
            "about:blank",
        ]
        with open(self._profile / "chromium.log", "wb") as log:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        port = self._devtools_port()
        self._socket = _WebSocket(self._page_websocket_url(port), self.timeout_s)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def close(self) -> None:
        """Stop Chromium and delete its profile."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, 15)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._process.pid, 9)
                self._process.wait()
            self._process = None
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    def __enter__(self) -> HeadlessChromium:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result; events in between are dropped."""
        if self._socket is None:
            raise BrowserError("the browser is not started")
        self._next_id += 1
        request_id = self._next_id
        self._socket.send_text(json.dumps({"id": request_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.receive_text())
            if message.get("id") != request_id:
                continue
            if "error" in message:
                raise BrowserError(f"{method} failed: {message['error']}")
            return message.get("result", {})

    def navigate(self, url: str) -> None:
        """Open ``url`` in the page; returns once the navigation is committed, not loaded."""
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url} failed: {result['errorText']}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float | None = None) -> Any:
        """Poll a JavaScript expression until it is truthy; its value, or ``BrowserError``.

        An expression that throws (the page is still loading, say) counts as not yet true.
        """
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        last_error: BrowserError | None = None
        while True:
            try:
                value = self.evaluate(expression)
            except BrowserError as error:
                value, last_error = None, error
            if value:
                return value
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        detail = f" (last error: {last_error})" if last_error else ""
        raise BrowserError(f"timed out waiting for {expression!r}{detail}")

    def element_box(self, selector: str) -> tuple[int, int, int, int]:
        """``(x, y, width, height)`` of the first element matching ``selector``, in CSS pixels."""
        box = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()"
        )
        return tuple(round(v) for v in box)

    def element_text(self, selector: str) -> str:
        """The ``textContent`` of the first element matching ``selector``."""
        return self.evaluate(f"document.querySelector({json.dumps(selector)}).textContent")

    def screenshot(self) -> np.ndarray:
        """The viewport now, as an HxWx3 uint8 RGB array."""
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise BrowserError("the screenshot is not a PNG")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def _devtools_port(self) -> int:
        # Chromium writes the port it picked for --remote-debugging-port=0 into the profile.
        port_file = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrowserError(f"Chromium exited early:\n{self._log_tail()}")
            lines = port_file.read_text().splitlines() if port_file.exists() else []
            if lines and lines[0].isdigit():
                return int(lines[0])
            time.sleep(0.05)
        raise BrowserError(f"Chromium opened no DevTools port:\n{self._log_tail()}")

    def _page_websocket_url(self, port: int) -> str:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                targets = _get_json("127.0.0.1", port, "/json/list")
            except (OSError, ValueError):  # not listening yet, or a half-written answer
                targets = []
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.05)
        raise BrowserError("Chromium has no page to attach to")

    def _log_tail(self) -> str:
        log = self._profile / "chromium.log"
        return log.read_text(errors="replace")[-4000:] if log.exists() else ""


def _get_json(host: str, port: int, path: str) -> Any:
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


class _WebSocket:
    """Just enough of RFC 6455 for DevTools: masked text frames out, unmasked frames in."""

    def __init__(self, url: str, timeout_s: float):
        parts = urlsplit(url)
        self._sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout_s)
        self._reader = SocketReader(
            self._sock, BrowserError, "DevTools connection closed", chunk=1 << 20
        )
        self._handshake(parts.netloc, parts.path)

    def _handshake(self, netloc: str, path: str) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self._sock.sendall(request.encode())
        head = self._reader.until(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise BrowserError(f"WebSocket handshake refused: {head[:200]!r}")

    def send_text(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def receive_text(self) -> str:
        """The next complete text message, answering pings on the way."""
        message = b""
        while True:
            fin, opcode, payload = self._receive_frame()
            if opcode == 0x8:
                raise BrowserError("DevTools closed the connection")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if fin:
                    return message.decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send_frame(0x8, b"")
        self._sock.close()

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        mask = os.urandom(4)
        masked = np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), length)
        self._sock.sendall(header + mask + masked.tobytes())

    def _receive_frame(self) -> tuple[bool, int, bytes]:
        first, second = self._reader.take(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._reader.take(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._reader.take(8))
        if second & 0x80:
            raise BrowserError("DevTools sent a masked frame")
        return bool(first & 0x80), first & 0x0F, self._reader.take(length)
