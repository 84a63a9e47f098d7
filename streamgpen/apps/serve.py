"""``streamgpen serve``: bind, load, serve until Ctrl-C/SIGTERM, then stop the work cleanly.

The order is ``enhance``'s: what can be refused is refused first (a port in use, a token missing
beyond loopback, missing weights all listed at once), then the models load, then the service runs.
On Ctrl-C or SIGTERM the server stops accepting, running jobs and streams are stopped with their
outputs finalised (a restart finds them), and the process exits 0.
"""

from __future__ import annotations

from pathlib import Path

from streamgpen.config import RunConfig, ServiceLimits
from streamgpen.files import cache_dir


def default_spool() -> Path:
    """``$XDG_CACHE_HOME/streamgpen/spool`` (``~/.cache/...`` without it)."""
    return cache_dir("spool")


def run(
    config: RunConfig,
    *,
    limits: ServiceLimits,
    host: str,
    port: int,
    token: str | None,
    spool: Path | None,
) -> int:
    """Serve until interrupted; returns the exit code. Raises UserError for a user's mistake."""
    from streamgpen.errors import UserError
    from streamgpen.web.auth import access_token, cookie_name
    from streamgpen.web.server import HttpServer

    try:
        token, generated = access_token(host, token)
    except ValueError as error:
        raise UserError(f"--token: {error}") from None
    # Bound before torch is even imported: a port in use is refused in a moment.
    server = HttpServer(None, host, port, option="--port").bind()
    try:
        from streamgpen.apps.enhance import announce, load_enhancer
        from streamgpen.progress import stderr_console
        from streamgpen.service.app import build_app
        from streamgpen.service.core import Service

        console = stderr_console()
        enhancer = load_enhancer(config)
        announce(config, enhancer, console)
        service = Service(
            config=config,
            enhancer=enhancer,
            spool=spool or default_spool(),
            limits=limits,
            token=token,
        ).start()
        try:
            server.app = build_app(service, cookie_name=cookie_name(server.port))
            # Even with -q: where it serves (--port 0 picks one) and a generated token.
            _announce(console, server, token if generated else None, service)
            server.serve_forever()
        finally:
            service.close()
    finally:
        server.stop()
    return 0


def _announce(console, server, generated_token: str | None, service) -> None:
    console.print(
        f"serving on {server.url('/')} (docs: {server.url('/docs')})", markup=False, soft_wrap=True
    )
    if generated_token is not None:
        console.print(
            f"token (send 'Authorization: Bearer TOKEN'): {generated_token}",
            markup=False,
            soft_wrap=True,
        )
    console.print(f"spool: {service.spool}", markup=False, soft_wrap=True)
