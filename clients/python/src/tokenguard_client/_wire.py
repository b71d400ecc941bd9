"""The agent's wire protocol (docs/PROTOCOL.md), shared by the blocking and the
asyncio client: finding the socket, framing, requests, responses and errors.

Nothing here logs, and no exception message ever holds a secret: the agent's error
messages never do, and this module adds only kinds, operations and token names.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
from typing import Any, Dict, Mapping, Optional, Tuple, Type

VERSION = 1
#: The default socket, when neither TOKENGUARD_SOCKET nor a configuration names one.
DEFAULT_SOCKET = "/run/tokenguard/agent.sock"
#: Largest response body the agent sends (16 MiB).
MAX_RESPONSE = 16 << 20
#: Largest request body the agent takes (512 KiB).
MAX_REQUEST = 512 << 10

_HEADER = struct.Struct(">I")


class TokenguardError(Exception):
    """An error from the agent, or from reaching it.

    ``kind`` is the agent's stable error kind (``not_found``, ``refused``, …, see
    docs/PROTOCOL.md); ``exit_code`` the CLI's exit code for it; ``hint`` what to do
    next, when the agent gave one.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        hint: Optional[str] = None,
        exit_code: int = 1,
        retry_after_ms: Optional[int] = None,
    ) -> None:
        super().__init__(message if not hint else f"{message} (hint: {hint})")
        self.kind = kind
        self.message = message
        self.hint = hint
        self.exit_code = exit_code
        self.retry_after_ms = retry_after_ms

    def __reduce__(self):  # type: ignore[override]
        # Picklable (process pools hand exceptions back to the parent).
        return (
            _rebuild,
            (type(self), self.kind, self.message, self.hint, self.exit_code, self.retry_after_ms),
        )


def _rebuild(cls, kind, message, hint, exit_code, retry_after_ms):  # type: ignore[no-untyped-def]
    return cls(kind, message, hint=hint, exit_code=exit_code, retry_after_ms=retry_after_ms)


class NotFound(TokenguardError):
    """No such token, field or store (exit code 3)."""


class ExpiredOrRevoked(TokenguardError):
    """The token cannot be served: expired, revoked, shredded, or its refresh token
    needs the user again (exit code 7)."""


class Refused(TokenguardError):
    """No rule of the agent's policy allows this caller this operation on this token
    (exit code 9)."""


class RateLimited(TokenguardError):
    """Over the caller's rate (exit code 10); ``retry_after`` says when, in seconds."""

    @property
    def retry_after(self) -> float:
        return (self.retry_after_ms or 0) / 1000.0


class Unavailable(TokenguardError):
    """The agent does not answer, or is in lockdown (exit code 11, or 5 locked)."""


class IntegrityError(TokenguardError):
    """Tampering, corruption or a wrong root key: fail closed (exit code 4)."""


class InvalidRequest(TokenguardError):
    """A malformed request or bad input (exit code 2)."""


_KINDS: Dict[str, Type[TokenguardError]] = {
    "not_found": NotFound,
    "expired": ExpiredOrRevoked,
    "revoked": ExpiredOrRevoked,
    "shredded": ExpiredOrRevoked,
    "needs_reauth": ExpiredOrRevoked,
    "refused": Refused,
    "rate_limited": RateLimited,
    "unavailable": Unavailable,
    "locked": Unavailable,
    "integrity": IntegrityError,
    "invalid": InvalidRequest,
}


def error_from_wire(e: Mapping[str, Any]) -> TokenguardError:
    """The exception for an ``error`` object of a response."""
    kind = str(e.get("kind", "other"))
    cls = _KINDS.get(kind, TokenguardError)
    retry = e.get("retry_after_ms")
    return cls(
        kind,
        str(e.get("message", "the agent reported an error")),
        hint=e.get("hint"),
        exit_code=int(e.get("exit_code", 1)),
        retry_after_ms=int(retry) if isinstance(retry, int) else None,
    )


def unavailable(socket_path: str, detail: str) -> Unavailable:
    return Unavailable(
        "unavailable",
        f"the tokenguard agent at {socket_path} is unavailable: {detail}",
        hint="is `tokenguard serve` running? (see docs/PROTOCOL.md, 'Finding the socket')",
        exit_code=11,
    )


def _config_paths() -> list:
    """The configuration files the CLI would read, in its order."""
    if os.environ.get("TOKENGUARD_CONFIG"):
        return [os.environ["TOKENGUARD_CONFIG"]]
    paths = []
    xdg = os.environ.get("XDG_CONFIG_HOME")
    if xdg and os.path.isabs(xdg):
        paths.append(os.path.join(xdg, "tokenguard", "tokenguard.toml"))
    elif os.environ.get("HOME"):
        paths.append(os.path.join(os.environ["HOME"], ".config", "tokenguard", "tokenguard.toml"))
    paths.append("/etc/tokenguard/tokenguard.toml")
    return paths


# A table header, `[name]` or `[[name]]` (an array of tables, such as [[agent.allow]]).
_TABLE = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\"-]+)\s*\]\]?\s*(#.*)?$")
_STRING = r"(\"(?:[^\"\\]|\\.)*\"|'[^']*')"
_SOCKET_KEY = re.compile(r"^\s*socket\s*=\s*" + _STRING + r"\s*(#.*)?$")
_DOTTED_KEY = re.compile(r"^\s*agent\s*\.\s*socket\s*=\s*" + _STRING + r"\s*(#.*)?$")


def _socket_in_config(text: str) -> Optional[str]:
    """``[agent] socket`` of a tokenguard configuration file."""
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        return scan_socket(text)
    try:
        agent = tomllib.loads(text).get("agent") or {}
    except ValueError:
        return None
    sock = agent.get("socket") if isinstance(agent, dict) else None
    return sock if isinstance(sock, str) else None


def _unquote(v: str) -> str:
    return json.loads(v) if v.startswith('"') else v[1:-1]


def scan_socket(text: str) -> Optional[str]:
    """``[agent] socket`` read line by line: the one key this client needs, on
    Python 3.9 and 3.10 (no ``tomllib``). Knows table headers, arrays of tables and
    a top-level ``agent.socket = …``; not inline tables."""
    table = ""
    for line in text.splitlines():
        m = _TABLE.match(line)
        if m:
            table = m.group(1)
            continue
        if table == "agent":
            m = _SOCKET_KEY.match(line)
            if m:
                return _unquote(m.group(1))
        elif table == "":
            m = _DOTTED_KEY.match(line)
            if m:
                return _unquote(m.group(1))
    return None


def find_socket() -> str:
    """The agent's socket, found as the CLI finds it: ``TOKENGUARD_SOCKET``, then
    ``[agent] socket`` of the configuration file (``TOKENGUARD_CONFIG``,
    ``$XDG_CONFIG_HOME/tokenguard/tokenguard.toml`` or
    ``~/.config/tokenguard/tokenguard.toml``, ``/etc/tokenguard/tokenguard.toml``;
    a relative path is relative to that file), then ``/run/tokenguard/agent.sock``."""
    env = os.environ.get("TOKENGUARD_SOCKET")
    if env:
        return env
    for path in _config_paths():
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        sock = _socket_in_config(text)
        if sock:
            # As the CLI does: a relative path is relative to the configuration file.
            return os.path.join(os.path.dirname(os.path.abspath(path)), sock)
        break
    return DEFAULT_SOCKET


def encode(req: Mapping[str, Any]) -> bytes:
    """One request frame."""
    body = json.dumps(req, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(body) > MAX_REQUEST:
        raise InvalidRequest("invalid", f"a request of {len(body)} bytes (the agent takes at most {MAX_REQUEST})", exit_code=2)
    return _HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    (n,) = _HEADER.unpack(header)
    if n == 0 or n > MAX_RESPONSE:
        raise ValueError(f"an answer frame of {n} bytes")
    return n


def decode(body: bytes, want_id: int) -> Any:
    """The result of a response body, or its error raised (an error without an id
    is marked ``_untied``: its connection is not to be used again)."""
    try:
        r = json.loads(body)
    except ValueError:
        raise ValueError("its answer is not JSON") from None
    if not isinstance(r, dict):
        raise ValueError("its answer is not a JSON object")
    ok = r.get("ok") is True
    rid = r.get("id")
    # An error the agent could not tie to a request (a frame it could not parse, or
    # a connection it turned away) carries no id.
    if rid != want_id and not (rid is None and not ok):
        raise ValueError("it answered another request")
    if ok:
        return r.get("result")
    err = r.get("error")
    if not isinstance(err, dict):
        raise ValueError("its answer has neither a result nor an error")
    e = error_from_wire(err)
    if rid is None:
        e._untied = True  # type: ignore[attr-defined]
    raise e


def secret_of(v: Mapping[str, Any]) -> Tuple[bytes, bool]:
    """The bytes of a ``{"value", "encoding"}`` object, and whether they were text."""
    value = v.get("value")
    if not isinstance(value, str):
        raise ValueError("its answer has no value")
    if v.get("encoding", "utf8") == "base64":
        return base64.b64decode(value, validate=True), False
    return value.encode("utf-8"), True


def text_of(v: Mapping[str, Any], what: str) -> str:
    value = v.get("value")
    if not isinstance(value, str):
        raise ValueError("its answer has no value")
    if v.get("encoding", "utf8") == "base64":
        raise InvalidRequest(
            "invalid",
            f"{what} is binary, not text; use get_bytes()",
            exit_code=2,
        )
    return value


def wire_value(value: Any) -> Dict[str, str]:
    """``value`` and ``encoding`` for a ``put``: text as it is, bytes in base64."""
    if isinstance(value, str):
        return {"value": value, "encoding": "utf8"}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"value": base64.b64encode(bytes(value)).decode("ascii"), "encoding": "base64"}
    raise TypeError("a secret is str or bytes")


def put_request(
    provider: str,
    name: str,
    value: Any = None,
    *,
    token_set: Optional[Mapping[str, str]] = None,
    expires_at: Any = None,
    labels: Optional[Mapping[str, str]] = None,
    scopes: Optional[list] = None,
    token_type: Optional[str] = None,
    overwrite: bool = True,
) -> Dict[str, Any]:
    if (value is None) == (token_set is None):
        raise TypeError("put takes a value or a token_set, not both or neither")
    req: Dict[str, Any] = {"op": "put", "provider": provider, "name": name, "overwrite": overwrite}
    if value is not None:
        req.update(wire_value(value))
    else:
        assert token_set is not None
        for k, v in token_set.items():
            if not isinstance(v, str):
                raise TypeError(f"token_set field {k!r} is not a str")
        req["token_set"] = dict(token_set)
    if expires_at is not None:
        if hasattr(expires_at, "timestamp"):
            expires_at = int(expires_at.timestamp())
        req["expires_at"] = int(expires_at)
    if labels:
        req["labels"] = dict(labels)
    if scopes:
        req["scopes"] = list(scopes)
    if token_type is not None:
        req["token_type"] = token_type
    return req


def token_request(op: str, provider: str, name: str, **fields: Any) -> Dict[str, Any]:
    req: Dict[str, Any] = {"op": op, "provider": provider, "name": name}
    req.update({k: v for k, v in fields.items() if v is not None and v is not False})
    return req


#: Operations that change nothing: safe to send again on a fresh connection when a
#: pooled one turns out to have been closed by the agent (idle timeout).
IDEMPOTENT = frozenset({"ping", "get", "get_fresh", "token_set", "list", "status", "stats"})
