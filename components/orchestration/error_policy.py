"""Which failures are worth a retry: transient ones (the network, a server's 5xx, a timeout) may pass on a second
try; deterministic ones (a bad config, bad data, a missing model, a failing reward) fail the same way again, so
retrying them only doubles the time to the error."""

from __future__ import annotations

import socket

TRANSIENT_TYPES: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, socket.gaierror)
TRANSIENT_NAMES = frozenset({  # third-party network errors, by class name: no import of optional clients here
    "ConnectTimeout", "ReadTimeout", "ConnectError", "RemoteProtocolError", "TransportError",  # httpx, requests
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",  # botocore
    "ClientConnectorError", "ServerDisconnectedError",  # aiohttp
})


def is_transient(exc: BaseException | None) -> bool:
    """Whether `exc` (or what it was raised from) looks like a transient failure: a network error or timeout, or
    an HTTP 5xx answer (an exception with `status_code` or `response.status_code` ≥ 500)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TRANSIENT_TYPES) or any(t.__name__ in TRANSIENT_NAMES for t in type(exc).__mro__):
            return True
        status = getattr(exc, "status_code", None) or getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(status, int) and status >= 500:
            return True
        exc = exc.__cause__ or exc.__context__
    return False
