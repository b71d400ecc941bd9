"""Client for the tokenguard agent (``tokenguard serve``).

    from tokenguard_client import Client

    tg = Client()                      # the socket the CLI would use
    token = tg.get("github", "ci-bot")
    fresh = tg.get_fresh("google", "reports")   # refreshed by the agent when due

Errors are :class:`TokenguardError` subclasses named for what went wrong:
:class:`NotFound`, :class:`ExpiredOrRevoked`, :class:`Refused`, :class:`RateLimited`,
:class:`Unavailable`, :class:`IntegrityError`, :class:`InvalidRequest`. The wire
protocol is docs/PROTOCOL.md in the tokenguard repository.
"""

from ._wire import (
    DEFAULT_SOCKET,
    ExpiredOrRevoked,
    IntegrityError,
    InvalidRequest,
    NotFound,
    RateLimited,
    Refused,
    TokenguardError,
    Unavailable,
    find_socket,
)
from .aio import AsyncClient
from .client import Client

__all__ = [
    "AsyncClient",
    "Client",
    "DEFAULT_SOCKET",
    "ExpiredOrRevoked",
    "IntegrityError",
    "InvalidRequest",
    "NotFound",
    "RateLimited",
    "Refused",
    "TokenguardError",
    "Unavailable",
    "find_socket",
]
__version__ = "0.1.0"
