"""The service's ASGI app: every endpoint of ``streamgpen serve`` behind one guard.

Layers, outermost first: ``SecurityHeaders`` (no framing, no sniffing, no caching, no Referer;
on refusals too), ``TokenGuard`` (a bearer token, ``?token=``, or the cookie that sets; without a
token, loopback Host headers only), ``RequestMetrics`` (``/metrics``' request figures), then
FastAPI's router: ``/v1/enhance`` (``images``), ``/v1/jobs`` (``jobs``), ``/v1/streams`` and
each stream's preview (``streams``), ``/metrics``, ``/healthz``, and the OpenAPI docs at
``/docs``. No CORS middleware: no other site's page may call this one.
"""

from __future__ import annotations

import inspect

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from streamgpen import __version__
from streamgpen.service.core import Service
from streamgpen.service.images import enhance_image
from streamgpen.service.metrics import RequestMetrics
from streamgpen.web.auth import TokenGuard
from streamgpen.web.responses import EXCEPTION_HANDLERS, SecurityHeaders, json_response


def build_app(service: Service, *, cookie_name: str) -> ASGIApp:
    """The whole service as one ASGI app; ``cookie_name`` names its token cookie (by port)."""
    api = FastAPI(
        title="streamgpen",
        version=__version__,
        description="GPEN face enhancement of photos, video jobs and live streams.",
        docs_url="/docs",
        redoc_url=None,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    api.state.service = service
    api.add_api_route("/v1/enhance", enhance_image, methods=["POST"], tags=["images"])
    _add(api, service.jobs.routes(), tag="jobs")
    _add(api, service.streams.routes(), tag="streams")
    api.add_api_route("/metrics", metrics, methods=["GET"], tags=["service"])
    api.add_api_route("/healthz", health, methods=["GET"], tags=["service"])
    guarded = TokenGuard(
        RequestMetrics(api, metrics=service.metrics), token=service.token, cookie_name=cookie_name
    )
    return SecurityHeaders(guarded)  # outermost: refusals carry the headers too


def _add(api: FastAPI, routes: list[BaseRoute], *, tag: str) -> None:
    """A manager's Starlette routes into the app: plain endpoints as documented API routes (their
    docstrings are the OpenAPI descriptions), mounts (a stream's preview) as they are."""
    for route in routes:
        if isinstance(route, Route) and inspect.isfunction(route.endpoint):
            methods = sorted((route.methods or {"GET"}) - {"HEAD"})
            api.add_api_route(route.path, route.endpoint, methods=methods, tags=[tag])
        else:
            api.router.routes.append(route)


async def metrics(request: Request) -> Response:
    """The service's figures in Prometheus' text format: requests by route and status, latency
    histograms, device batches and faces per batch, queue depth, jobs by state, streams."""
    figures = request.app.state.service.metrics
    return Response(figures.render(), media_type=figures.content_type)


async def health(request: Request) -> Response:
    """Liveness: the model, its device and the queue's depth."""
    service: Service = request.app.state.service
    return json_response(
        {
            "status": "ok",
            "model": service.config.enhancer.model.label,
            "device": str(service.enhancer.device),
            "queued": service.batcher.queued,
        }
    )
