"""A small HTTP client for the service, used by the flows, the evaluation and the tests."""

from __future__ import annotations

import base64
import io
from types import TracebackType
from typing import Any

import httpx
from PIL import Image

from service.schema import GenerateResponse, HealthResponse


class ServiceCallError(Exception):
    """A non-2xx answer, with the service's own error type and message."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(f"HTTP {status} ({error_type}): {message}")
        self.status, self.error_type, self.message = status, error_type, message


class ServiceClient:
    """`health()`, `ready()`, `generate(**payload)` and `metrics_text()` against one base URL."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 300.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def health(self) -> HealthResponse:
        """This release's `/health` (an older release or another service: `ServiceHealth.of` its body)."""
        return HealthResponse.model_validate(self._json(self._http.get("/health")))

    def ready(self) -> bool:
        try:
            return self._http.get("/ready", timeout=15).status_code == 200
        except httpx.HTTPError:
            return False

    def generate(self, **payload: Any) -> GenerateResponse:
        return GenerateResponse.model_validate(self._json(self._http.post("/generate", json=payload)))

    def metrics_text(self) -> str:
        response = self._http.get("/metrics")
        self._raise_for(response)
        return response.text

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        self._raise_for(response)
        return response.json()

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.is_success:
            return
        try:
            body = response.json()
            raise ServiceCallError(
                response.status_code, body.get("error_type", "?"), body.get("error", response.text)
            )
        except ValueError:
            raise ServiceCallError(response.status_code, "http", response.text[:500]) from None


def decode_image(b64: str) -> Image.Image:
    """The image of a `/generate` answer (raises on invalid base64 or an undecodable image)."""
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    image.load()
    return image
