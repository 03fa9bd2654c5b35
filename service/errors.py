"""Every error kind of the service and the HTTP status it maps to (the one place for that mapping)."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error the service answers with `{success: false, error, error_type}`."""

    status_code = 500
    error_type = "internal"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class ValidationFailed(ServiceError):
    """The request names a bad value (422)."""

    status_code = 422
    error_type = "validation"

    def __init__(self, field: str, value: Any, reason: str) -> None:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{field}: {reason} (got {shown})")
        self.field = field


class Unsupported(ServiceError):
    """An operation this server does not offer, e.g. an AUTOMATIC1111 route beyond txt2img (404)."""

    status_code = 404
    error_type = "unsupported"


class BodyTooLarge(ServiceError):
    """The request body is larger than `max_body_bytes` (413)."""

    status_code = 413
    error_type = "validation"


class HeadersTooLarge(ServiceError):
    """The request line and headers are larger than `max_header_bytes` (431)."""

    status_code = 431
    error_type = "validation"


class ClientTooSlow(ServiceError):
    """The request body did not arrive within `body_timeout_s` (408); the connection is closed."""

    status_code = 408
    error_type = "client_timeout"


class Unauthorized(ServiceError):
    """Missing or wrong API key (401)."""

    status_code = 401
    error_type = "unauthorized"

    def __init__(
        self, message: str = "missing or invalid API key (send 'Authorization: Bearer <key>')"
    ) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Overloaded(ServiceError):
    """The queue is full; come back later (429)."""

    status_code = 429
    error_type = "overloaded"

    def __init__(self, queued: int, retry_after_s: int) -> None:
        super().__init__(
            f"queue full ({queued} requests waiting); retry in {retry_after_s} s",
            headers={"Retry-After": str(retry_after_s)},
        )


class NotReady(ServiceError):
    """The model is still loading, or failed to load (503)."""

    status_code = 503
    error_type = "not_ready"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class GenerationTimeout(ServiceError):
    """The request ran past `request_timeout_s`, queueing included (504)."""

    status_code = 504
    error_type = "timeout"


class OutOfMemory(ServiceError):
    """The GPU ran out of memory during this request; memory was freed (500)."""

    status_code = 500
    error_type = "out_of_memory"


class GenerationFailed(ServiceError):
    """The pipeline raised during this request (500)."""

    status_code = 500
    error_type = "generation"


class Cancelled(Exception):
    """A job was cancelled (its client timed out) before or while it ran."""
