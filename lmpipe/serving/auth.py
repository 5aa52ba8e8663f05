"""Bearer-token auth of the endpoint: where the token comes from, who may bind where, the check per request.

With a token (`--token-file PATH`, else env LMPIPE_API_TOKEN) /predict, /metrics, /drift and /admin/* need
`Authorization: Bearer <token>`; /health stays open (load balancers probe it). Without one the server binds
loopback only, unless `--allow-unauthenticated` says a non-loopback host is meant to be open.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

from lmpipe.errors import LmpipeError

TOKEN_ENV = "LMPIPE_API_TOKEN"


def resolve_token(token_file: str | None) -> str | None:
    """The token from `token_file` (surrounding whitespace stripped), else $LMPIPE_API_TOKEN, else None."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise LmpipeError(f"--token-file {token_file}: cannot read ({getattr(e, 'strerror', None) or e})") from None
        if not token:
            raise LmpipeError(f"--token-file {token_file}: empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only `localhost` is known to stay on this machine
        return False


def check_bind(host: str, token: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to open an unauthenticated endpoint beyond this machine unless asked to."""
    if token is None and not allow_unauthenticated and not is_loopback(host):
        raise LmpipeError(f"serve: --host {host} is not loopback and no token is set ({TOKEN_ENV} or --token-file); "
                          "pass --allow-unauthenticated to serve it open")


def authorized(header: str | None, token: str | None) -> bool:
    """Whether an Authorization header carries the token (constant-time comparison); no token = open."""
    if token is None:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
