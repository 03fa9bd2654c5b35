"""Request dependencies shared by every router: the service state and the API-key check (one place)."""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Annotated

from fastapi import Depends, Request

from service.errors import Unauthorized
from service.state import ServiceState


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


def _check_key(request: Request, state: ServiceState, *, basic: bool) -> None:
    """Compare the presented key with the configured one in constant time; 401 when it differs."""
    expected = state.settings.api_key
    if expected is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    secret = given.strip()
    if basic and scheme.lower() == "basic":
        try:
            secret = base64.b64decode(secret, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            secret = ""
    elif scheme.lower() != "bearer":
        secret = ""
    if not secret or not hmac.compare_digest(secret.encode(), expected.get_secret_value().encode()):
        raise Unauthorized()


def require_api_key(request: Request, state: StateDep) -> None:
    """With an API key set: `Authorization: Bearer <key>`."""
    _check_key(request, state, basic=False)


def require_api_key_or_basic(request: Request, state: StateDep) -> None:
    """With an API key set: `Bearer <key>`, or HTTP Basic with the key as password (A1111 clients such
    as webuiapi's `set_auth` speak Basic; the user name is not checked)."""
    _check_key(request, state, basic=True)
