"""The shared web layer, for real: ``HttpServer`` (uvicorn) binding, serving, stopping and its
connection cap; ``TokenGuard``; strict JSON in (``read_json``) and out; errors as JSON; the
security headers. A small Starlette app stands for the preview and the service; every request
goes over loopback through a real socket, except the websocket handshakes (Starlette's
TestClient drives the ASGI app: the server is built without websocket support).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute

with warnings.catch_warnings():  # Starlette 1.10 would rather have httpx2 drive its TestClient
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from streamgpen.errors import UserError
from streamgpen.preview import server as preview_server
from streamgpen.web import server as web_server
from streamgpen.web.auth import TokenGuard, cookie_name, token_cookie
from streamgpen.web.responses import (
    EXCEPTION_HANDLERS,
    HttpError,
    SecurityHeaders,
    json_response,
    read_json,
)
from streamgpen.web.server import MAX_CONNECTIONS, HttpServer

TIMEOUT_S = 10.0
TOKEN = "s3cret-Token"
COOKIE = "test_cookie"


# --- the app -----------------------------------------------------------------------------------


async def echo(request):
    return json_response({"got": await read_json(request, max_bytes=64)})


async def figures(request):
    return json_response({"nan": float("nan"), "inf": -float("inf"), "np": np.float32(1.5)})


async def cached(request):
    return Response("x", headers={"Cache-Control": "max-age=60"})


async def teapot(request):
    raise HttpError(418, "short and stout", {"X-Why": "tea"})


async def boom(request):
    raise RuntimeError("a bug, on purpose")


async def drip(request):
    """A response that never ends: a byte every 0.2 s."""

    async def forever():
        while True:
            yield b"."
            await asyncio.sleep(0.2)

    return StreamingResponse(forever(), media_type="text/plain")


async def hello_socket(websocket):
    await websocket.accept()
    await websocket.send_text("hello")
    await websocket.close()


def make_app(token: str | None = None):
    """The test app as the preview and the service build theirs: guard, headers, exceptions."""
    app = Starlette(
        routes=[
            Route("/echo", echo, methods=["POST"]),
            Route("/figures", figures),
            Route("/cached", cached),
            Route("/teapot", teapot),
            Route("/boom", boom),
            Route("/drip", drip),
            WebSocketRoute("/socket", hello_socket),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
    )
    return SecurityHeaders(TokenGuard(app, token=token, cookie_name=COOKIE))


def request(port, method, path, body=None, headers=None):
    """One request to 127.0.0.1:``port``: ``(status, headers, body)``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` as it is, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


# --- HttpServer ---------------------------------------------------------------------------------


def test_bind_errors_name_the_option():
    assert preview_server.parse_bind is web_server.parse_bind  # one implementation
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError) as caught:
            HttpServer(make_app(), "127.0.0.1", port, option="--port").bind()
        assert str(caught.value) == f"--port 127.0.0.1:{port}: port in use"
    cases = {
        ("no-such-host.invalid", 80): "--port no-such-host.invalid:80: cannot resolve host "
        "no-such-host.invalid",
        ("192.0.2.1", 80): "--port 192.0.2.1:80: not an address of this machine",  # TEST-NET-1
    }
    for (host, port), message in cases.items():
        with pytest.raises(UserError) as caught:
            HttpServer(make_app(), host, port, option="--port").bind()
        assert str(caught.value) == message


def test_start_stop_and_urls():
    server = HttpServer(None, "127.0.0.1", 0).bind()
    try:
        assert server.bind() is server and server.port != 0  # idempotent; the real port
        with pytest.raises(RuntimeError, match="no app"):
            server.start()
        server.app = make_app()  # set after bind(), as `streamgpen serve` does
        assert server.start() is server
        # start() returns once the server accepts: the first request is answered at once.
        assert request(server.port, "GET", "/figures")[0] == 200
        assert server.url("/docs", token="t") == f"http://127.0.0.1:{server.port}/docs?token=t"
        assert server.url() == f"http://127.0.0.1:{server.port}/"
    finally:
        server.stop()
        server.stop()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    wildcard = HttpServer(make_app(), "0.0.0.0", 8000)
    assert wildcard.url("/") == f"http://{socket.gethostname()}:8000/"
    assert HttpServer(make_app(), "::1", 8000).url("/x") == "http://[::1]:8000/x"


def test_serve_forever_ends_on_stop_from_another_thread():
    server = HttpServer(make_app(), "127.0.0.1", 0).bind()
    returned: list = []
    thread = threading.Thread(target=lambda: returned.append(server.serve_forever()), daemon=True)
    thread.start()
    try:
        assert request(server.port, "GET", "/figures")[0] == 200
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) as stream:
            stream.sendall(b"GET /drip HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert b" 200 " in stream.recv(4096)
            started = time.monotonic()
            server.stop()
            thread.join(TIMEOUT_S)
            stopped = time.monotonic() - started
            # The open stream was cut STOP_GRACE_S after the stop began: ~1.2 s (4 runs).
            assert not thread.is_alive() and returned == [None]
            assert stopped < web_server.STOP_GRACE_S + 2.0, stopped
    finally:
        server.stop()


SERVE_SCRIPT = textwrap.dedent(
    """
    import asyncio
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route
    from streamgpen.web.server import HttpServer

    async def drip(request):
        async def forever():
            while True:
                yield b"."
                await asyncio.sleep(0.2)
        return StreamingResponse(forever())

    server = HttpServer(Starlette(routes=[Route("/drip", drip)]), "127.0.0.1", 0, option="--port")
    print(server.bind().port, flush=True)
    ended_by = server.serve_forever()
    server.stop()
    print("returned", ended_by, flush=True)
    """
)


def test_serve_forever_returns_on_ctrl_c():
    # uvicorn alone re-raises the signal once it has stopped: KeyboardInterrupt, a traceback.
    # Measured: the process exits 0 ~1.2 s after SIGINT with a stream open (4 runs).
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(process.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as stream:
            stream.sendall(b"GET /drip HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert b" 200 " in stream.recv(4096)
            started = time.monotonic()
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=TIMEOUT_S)
            ended = time.monotonic() - started
        assert process.returncode == 0, err
        assert out.strip() == f"returned {int(signal.SIGINT)}", (out, err)
        assert "Traceback" not in err, err
        assert ended < web_server.STOP_GRACE_S + 3.0, ended
    finally:
        process.kill()
        process.wait()


def test_connections_beyond_the_cap_get_503():
    # MAX_CONNECTIONS responses under way (none waiting for a head, so none gives way): the next
    # request is answered 503 by uvicorn's limit_concurrency; once one ends, requests pass again.
    with HttpServer(make_app(), "127.0.0.1", 0) as server:
        streams = []
        try:
            for _ in range(MAX_CONNECTIONS):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S)
                sock.sendall(b"GET /drip HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                streams.append(sock)
            for sock in streams:
                assert b" 200 " in sock.recv(4096)
            status, headers, _ = request(server.port, "GET", "/figures")
            assert status == 503 and headers["Connection"] == "close"
            streams.pop().close()
            deadline = time.monotonic() + TIMEOUT_S
            while request(server.port, "GET", "/figures")[0] != 200:
                assert time.monotonic() < deadline, "no room after a stream ended"
                time.sleep(0.05)
        finally:
            for sock in streams:
                sock.close()


# --- TokenGuard ---------------------------------------------------------------------------------


def test_token_guard_requires_the_token_everywhere():
    with HttpServer(make_app(TOKEN), "127.0.0.1", 0) as server:
        port = server.port
        for method, path in (
            ("GET", "/figures"),
            ("GET", "/nope"),
            ("DELETE", "/figures"),
            ("OPTIONS", "/echo"),
            ("GET", "/figures?token=wrong"),
            ("GET", f"/figures?token={TOKEN}x"),
        ):
            status, headers, body = request(port, method, path)
            assert status == 401, (method, path)
            assert headers["WWW-Authenticate"] == "Bearer"
            assert json.loads(body) == {"error": "missing or wrong token"}
            assert headers["X-Content-Type-Options"] == "nosniff"
        wrong = (
            {"Authorization": "Bearer nope"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Cookie": f"other={TOKEN}"},
        )
        for headers in wrong:
            assert request(port, "GET", "/figures", headers=headers)[0] == 401, headers
        right = (
            {"Authorization": f"Bearer {TOKEN}"},
            {"Authorization": f"bearer  {TOKEN} "},
            {"Cookie": f"a=b; {token_cookie(TOKEN, COOKIE).split(';')[0]}"},
        )
        for headers in right:
            assert request(port, "GET", "/figures", headers=headers)[0] == 200, headers
        assert request(port, "GET", f"/figures?x=1&token={TOKEN}")[0] == 200
    assert token_cookie("t", "c") == "c=t; Path=/; HttpOnly; SameSite=Strict"
    assert cookie_name(8765) == "streamgpen_token_8765"
    with pytest.raises(ValueError):
        TokenGuard(make_app(), token="bad; token", cookie_name=COOKIE)


def test_without_a_token_the_host_must_be_loopback():
    # A DNS-rebinding page reaches a loopback server under its own name: the Host header says so.
    with HttpServer(make_app(), "127.0.0.1", 0) as server:
        port = server.port
        for host in (f"127.0.0.1:{port}", "localhost", f"[::1]:{port}", "127.5.6.7"):
            assert request(port, "GET", "/figures", headers={"Host": host})[0] == 200, host
        for host in (f"evil.example:{port}", "0.0.0.0", "192.168.1.2", "[::1"):
            status, _, body = request(port, "GET", "/figures", headers={"Host": host})
            assert status == 403 and json.loads(body)["error"], host
        # HTTP/1.0 without a Host header at all.
        reply = raw_exchange(port, b"GET /figures HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 403 "), reply[:40]


def test_websocket_handshakes_are_guarded_too():
    with TestClient(make_app(TOKEN), base_url="http://127.0.0.1") as client:
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/socket"):
            pass
        assert refused.value.code == 1008
        with client.websocket_connect(f"/socket?token={TOKEN}") as websocket:
            assert websocket.receive_text() == "hello"
    with (
        TestClient(make_app(), base_url="http://evil.example") as client,
        pytest.raises(WebSocketDisconnect),
        client.websocket_connect("/socket"),
    ):
        pass


# --- JSON in and out, errors, headers -----------------------------------------------------------


def test_read_json_takes_only_small_strict_json():
    with HttpServer(make_app(), "127.0.0.1", 0) as server:
        port = server.port

        def post(body, content_type="application/json", **headers):
            return request(port, "POST", "/echo", body, {"Content-Type": content_type} | headers)

        status, _, body = post(b'{"a": [1, 2.5, null]}', "application/json; charset=utf-8")
        assert status == 200 and json.loads(body) == {"got": {"a": [1, 2.5, None]}}
        for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
            assert post(b"{}", content_type)[0] == 415, content_type
        status, headers, _ = post(b" " * 65)
        assert status == 413 and headers["Connection"] == "close"
        # No Content-Length: counted while reading.
        chunks = iter([b"[" + b" " * 40, b" " * 40 + b"]"])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
        connection.request(
            "POST", "/echo", chunks, {"Content-Type": "application/json"}, encode_chunked=True
        )
        assert connection.getresponse().status == 413
        connection.close()
        for bad in (b"{nope", b"\xff\xfe", b"[NaN]", b"[Infinity]", b"[-Infinity]", b"[" * 64):
            status, _, body = post(bad)
            assert status == 400 and json.loads(body)["error"], bad
        bad_length = raw_exchange(
            port,
            b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 99999999999999999999\r\nConnection: close\r\n\r\n",
        )
        assert bad_length.split(b"\r\n", 1)[0] in (
            b"HTTP/1.1 413 Request Entity Too Large",
            b"HTTP/1.1 413 Content Too Large",
        ), bad_length


def test_errors_are_json_and_every_response_has_the_headers():
    with HttpServer(make_app(), "127.0.0.1", 0) as server:
        port = server.port
        status, headers, body = request(port, "GET", "/figures")
        # Strict JSON: what a browser's JSON.parse takes; numpy unwrapped.
        assert status == 200 and json.loads(body) == {"nan": None, "inf": None, "np": 1.5}
        assert headers["Cache-Control"] == "no-store"
        for name, value in (
            ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", "DENY"),
            ("Content-Security-Policy", "frame-ancestors 'none'"),
            ("Cross-Origin-Resource-Policy", "same-origin"),
            ("Referrer-Policy", "no-referrer"),
        ):
            assert headers[name] == value, name
        assert "Server" not in headers  # not advertised
        assert request(port, "GET", "/cached")[1]["Cache-Control"] == "max-age=60"
        status, headers, body = request(port, "GET", "/teapot")
        assert (status, json.loads(body), headers["X-Why"]) == (
            418,
            {"error": "short and stout"},
            "tea",
        )
        status, headers, body = request(port, "GET", "/nope")
        assert status == 404 and headers.get_content_type() == "application/json"
        assert json.loads(body) == {"error": "Not Found"}
        status, headers, body = request(port, "PUT", "/echo")
        assert status == 405 and headers["Allow"] == "POST" and json.loads(body)["error"]
        status, headers, body = request(port, "GET", "/boom")  # uvicorn logs the traceback
        assert status == 500 and json.loads(body) == {"error": "internal error"}
        assert headers["X-Frame-Options"] == "DENY"
        assert request(port, "GET", "/figures")[0] == 200  # the server is fine
