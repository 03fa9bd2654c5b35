"""The FastAPI application: routes, auth, body limit and the error-to-response mapping."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__, a1111
from service.deps import StateDep, require_api_key, require_api_key_or_basic
from service.errors import (
    BodyTooLarge,
    ClientTooSlow,
    HeadersTooLarge,
    ServiceError,
    ValidationFailed,
)
from service.schema import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    ReadyResponse,
    error_responses,
)
from service.settings import ServiceSettings
from service.state import ServiceState

log = logging.getLogger(__name__)

ERROR_RESPONSES = error_responses(401, 408, 413, 422, 429, 431, 500, 503, 504)
"""Every error status a body-taking route can answer; each body is an `ErrorResponse`."""


Authorized = Depends(require_api_key)


def create_app(settings: ServiceSettings | None = None, state: ServiceState | None = None) -> FastAPI:
    """Build the app; the model starts loading when the app starts (its lifespan)."""
    settings = settings or ServiceSettings()
    state = state or ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.status == "loading" and not state.engine.loaded:
            state.start_loading()
        yield
        state.queue.shutdown()

    app = FastAPI(
        title="Image generation service",
        version=__version__,
        description="SD1.5 / SDXL (+ refiner) behind one HTTP contract.",
        lifespan=lifespan,
    )
    app.state.service = state
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
        max_head_bytes=settings.max_header_bytes,
    )
    _install_error_handlers(app, state)
    _count_requests(app, state)

    @app.get("/health", response_model=HealthResponse)
    def health(state: StateDep) -> HealthResponse:
        """Always 200 while the process lives; `status` says healthy, loading or unhealthy."""
        return state.health()

    @app.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
    async def ready(state: StateDep) -> JSONResponse:
        """200 only when the model is loaded and a tiny operation on its device succeeds."""
        if state.status != "ready":
            detail = state.load_error or "model is still loading"
            return JSONResponse(ReadyResponse(ready=False, detail=detail).model_dump(), status_code=503)
        try:
            await asyncio.wait_for(asyncio.to_thread(state.engine.probe), timeout=10)
        except Exception as exc:
            detail = f"device check failed: {type(exc).__name__}: {exc}"
            return JSONResponse(ReadyResponse(ready=False, detail=detail).model_dump(), status_code=503)
        return JSONResponse(ReadyResponse(ready=True, detail=f"{state.engine.device} ok").model_dump())

    @app.post(
        "/generate", response_model=GenerateResponse, responses=ERROR_RESPONSES, dependencies=[Authorized]
    )
    async def generate(req: GenerateRequest, state: StateDep) -> GenerateResponse:
        """Generate one image; the answer carries it as base64 with its seed and timings."""
        return await state.generate(req)

    @app.get(
        "/metrics",
        dependencies=[Authorized],
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
            401: {"model": ErrorResponse},
        },
    )
    def metrics(state: StateDep) -> Response:
        """Prometheus metrics: requests, latency, queue depth, errors, VRAM."""
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(a1111.create_router())  # /sdapi/v1: the AUTOMATIC1111-compatible API
    if state.settings.api_key is not None:
        _declare_bearer_auth(app)
    return app


def _declare_bearer_auth(app: FastAPI) -> None:
    """Say in the OpenAPI schema which operations need the API key (those whose dependencies include a
    key check) and how it may be sent; only done when a key is configured."""
    from fastapi.openapi.utils import get_openapi
    from fastapi.routing import APIRoute

    # each key check -> the schemes it accepts (the A1111 router also takes HTTP Basic, as A1111 does)
    schemes = {require_api_key: ["bearerAuth"], require_api_key_or_basic: ["bearerAuth", "basicAuth"]}

    def accepted(dependant: Any) -> list[str]:
        for dep in dependant.dependencies:
            found = schemes.get(dep.call) or accepted(dep)
            if found:
                return found
        return []

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(
                bearerAuth={"type": "http", "scheme": "bearer"},
                basicAuth={"type": "http", "scheme": "basic", "description": "the API key as password"},
            )
            for route in _all_routes(app.routes):
                names = accepted(route.dependant) if isinstance(route, APIRoute) else []
                for method in getattr(route, "methods", None) or () if names else ():
                    operation = schema["paths"].get(route.path_format, {}).get(method.lower())
                    if operation is not None:  # HEAD and hidden routes are not in the schema
                        operation["security"] = [{name: []} for name in names]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _all_routes(routes: list[Any]) -> Iterator[Any]:
    """Routes, with those of included routers (FastAPI keeps an included router as one route)."""
    for route in routes:
        router = getattr(route, "original_router", None)
        yield from _all_routes(router.routes) if router is not None else (route,)


def error_response(
    status: int, message: str, error_type: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorResponse(error=message, error_type=error_type).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI, state: ServiceState) -> None:
    """Every error kind answers `{success: false, error, error_type}` with the status from service.errors."""

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
        state.metrics.errors.labels(exc.error_type).inc()
        if exc.status_code >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc.message)
        return error_response(exc.status_code, exc.message, exc.error_type, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await on_service_error(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not decode the body (e.g. not UTF-8): a bad body, 422
            failed = ValidationFailed("body", None, f"malformed body: {exc.detail}")
            failed.message = f"body: malformed body ({exc.detail})"
            return await on_service_error(request, failed)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette names only the first route's methods when routes share a path
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return error_response(exc.status_code, str(exc.detail), kind, headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        state.metrics.errors.labels("internal").inc()
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", "internal")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this path (for a 405's `Allow`)."""
    allowed: set[str] = set()
    for route in request.app.router.routes:
        methods = getattr(route, "methods", None)
        if methods and route.matches(request.scope)[0] is not Match.NONE:
            allowed |= methods
    return sorted(allowed)


def validation_error(exc: RequestValidationError) -> ValidationFailed:
    """The first problem of a rejected body, as a message that names the field and the value."""
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(loc) or "body"
    if first.get("type") == "json_invalid":
        return ValidationFailed("body", first.get("ctx", {}).get("error", "?"), "malformed JSON")
    if first.get("type") == "missing":
        failed = ValidationFailed(field, None, "field required")
        failed.message = f"{field}: field required"
        return failed
    return ValidationFailed(field, first.get("input"), first.get("msg", "invalid value"))


def _count_requests(app: FastAPI, state: ServiceState) -> None:
    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        state.metrics.requests.labels(path, str(response.status_code)).inc()
        return response


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413 (declared or streamed), bodies slower than
    `timeout_s` with 408, and a request line + headers over `max_head_bytes` with 431; each closes the
    connection. (uvicorn's own head limit only applies to heads that arrive in pieces.)"""

    def __init__(
        self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0, max_head_bytes: int = 16_384
    ) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self.max_head_bytes = max_head_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string", b""))
        head += sum(len(name) + len(value) + 4 for name, value in scope.get("headers", []))
        if head > self.max_head_bytes:
            message = f"headers: request line and headers of {head} bytes exceed {self.max_head_bytes} bytes"
            await self._refuse(send, HeadersTooLarge(message))
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, self._too_large(int(declared)))
            return
        chunks: list[bytes] = []
        size, more = 0, True
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:  # builtin TimeoutError only from 3.11
                log.warning("closed %s %s: body not received within %g s", *_where(scope), self.timeout_s)
                await self._refuse(
                    send, ClientTooSlow(f"body: request body not received within {self.timeout_s:g} s")
                )
                return
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._refuse(send, self._too_large(size))
                return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, size: int) -> BodyTooLarge:
        return BodyTooLarge(f"body: request body of {size} bytes exceeds the limit of {self.max_bytes} bytes")

    @staticmethod
    async def _refuse(send: Send, error: ServiceError) -> None:
        payload = json.dumps(ErrorResponse(error=error.message, error_type=error.error_type).model_dump())
        body = payload.encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _where(scope: Scope) -> tuple[str, str]:
    return scope.get("method", "?"), scope.get("path", "?")
