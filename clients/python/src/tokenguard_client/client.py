"""The blocking client: thread-safe, with connections reused from a small pool."""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from typing import Any, Dict, List, Mapping, Optional

from . import _wire
from ._wire import TokenguardError


class _Conn:
    __slots__ = ("sock", "used")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.used = False

    def closed_by_peer(self) -> bool:
        """Whether the agent has closed this idle connection (its idle timeout):
        an idle connection has nothing to read, so any readable byte or EOF means
        it is no longer usable."""
        try:
            self.sock.setblocking(False)
            self.sock.recv(1, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False
        except OSError:
            return True


class _SendFailed(Exception):
    """The request could not be sent whole: the agent cannot have acted on it."""


class Client:
    """A client of the tokenguard agent.

    ``socket`` defaults to the one the CLI would use (``TOKENGUARD_SOCKET``, then the
    configuration file's ``[agent] socket``, then ``/run/tokenguard/agent.sock``).
    ``timeout`` bounds each request, in seconds. One ``Client`` may be shared by any
    number of threads: each call takes an idle connection (or opens one) and gives it
    back when the answer is read. At most ``pool_size`` connections are open at once
    (further calls wait for one; the agent allows 32 per uid by default). A process
    forked from one that used the client (a pre-forking server, ``multiprocessing``)
    opens connections of its own.

    Secrets come back as ``str`` (or ``bytes`` from :meth:`get_bytes`); Python cannot
    wipe them, so keep them no longer than needed.
    """

    def __init__(self, socket: Optional[str] = None, *, timeout: float = 10.0, pool_size: int = 8) -> None:
        self.socket_path = socket or _wire.find_socket()
        self.timeout = timeout
        self._pool_size = pool_size
        self._ids = itertools.count(1)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self._pool_size)
        self._idle: List[_Conn] = []

    def _after_fork(self) -> None:
        """In a forked child, the parent's connections (and a lock another thread may
        have held at the fork) are not this process's: drop them, unclosed-by-peer,
        so that parent and child never share a stream."""
        if self._pid != os.getpid():
            for c in self._idle:
                try:
                    c.sock.detach()
                except OSError:
                    pass
            self._reset()

    def __repr__(self) -> str:
        return f"Client(socket={self.socket_path!r})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the idle connections; calls after this open new ones."""
        self._after_fork()
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.sock.close()

    # Connections.

    def _connect(self) -> _Conn:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.socket_path)
        except FileNotFoundError:
            s.close()
            raise _wire.unavailable(self.socket_path, "no socket there") from None
        except ConnectionRefusedError:
            s.close()
            raise _wire.unavailable(self.socket_path, "nothing listens on the socket") from None
        except PermissionError:
            s.close()
            raise _wire.unavailable(
                self.socket_path, "permission denied: this user may not connect (see [agent] socket_group)"
            ) from None
        except OSError as e:
            s.close()
            raise _wire.unavailable(self.socket_path, e.strerror or str(e)) from None
        return _Conn(s)

    def _take(self) -> _Conn:
        while True:
            with self._lock:
                c = self._idle.pop() if self._idle else None
            if c is None:
                return self._connect()
            if not c.closed_by_peer():
                return c
            c.sock.close()

    def _give_back(self, c: _Conn) -> None:
        with self._lock:
            if len(self._idle) < self._pool_size:
                c.used = True
                self._idle.append(c)
                return
        c.sock.close()

    def _recv(self, c: _Conn, n: int, deadline: float) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout()
        c.sock.settimeout(left)
        chunk = c.sock.recv(n)
        if not chunk:
            raise ConnectionResetError("closed")
        return chunk

    def _exchange(self, c: _Conn, frame: bytes, want_id: int) -> Any:
        deadline = time.monotonic() + self.timeout
        c.sock.settimeout(self.timeout)
        try:
            c.sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise _SendFailed(e.__class__.__name__) from None
        # One recv takes a small answer whole; a larger one is read to its end, all
        # within the request's timeout.
        buf = bytearray(self._recv(c, 65536, deadline))
        while len(buf) < 4:
            buf += self._recv(c, 4 - len(buf), deadline)
        n = _wire.frame_length(bytes(buf[:4]))
        while len(buf) < 4 + n:
            buf += self._recv(c, 4 + n - len(buf), deadline)
        if len(buf) > 4 + n:
            raise ValueError("it sent more than one answer")
        return _wire.decode(bytes(buf[4:]), want_id)

    def call(self, req: Mapping[str, Any]) -> Any:
        """Sends one request (``op`` and its fields, docs/PROTOCOL.md) and returns its
        ``result``; the agent's error is raised as its exception class."""
        self._after_fork()
        if not self._slots.acquire(timeout=self.timeout):
            raise _wire.unavailable(self.socket_path, f"no free connection within {self.timeout} s")
        try:
            return self._call(req)
        finally:
            self._slots.release()

    def _call(self, req: Mapping[str, Any]) -> Any:
        op = str(req.get("op"))
        for attempt in (0, 1):
            c = self._take()
            want = next(self._ids)
            frame = _wire.encode({"v": _wire.VERSION, "id": want, **req})
            try:
                result = self._exchange(c, frame, want)
            except _SendFailed as e:
                c.sock.close()
                # Not sent whole: the agent cannot have acted on it, so once more on a
                # fresh connection, whatever the operation.
                if attempt == 0:
                    continue
                raise _wire.unavailable(self.socket_path, f"sending failed ({e})") from None
            except TokenguardError as e:
                # An error answer: the connection is in step unless the agent could
                # not tie it to this request (it closes those connections).
                if getattr(e, "_untied", False):
                    c.sock.close()
                else:
                    self._give_back(c)
                raise
            except ConnectionResetError as e:
                c.sock.close()
                # Closed before answering: for requests that change nothing, once more.
                if c.used and attempt == 0 and op in _wire.IDEMPOTENT:
                    continue
                raise _wire.unavailable(self.socket_path, f"the connection failed ({e.__class__.__name__})") from None
            except socket.timeout:
                c.sock.close()
                raise _wire.unavailable(self.socket_path, f"no answer within {self.timeout} s") from None
            except (OSError, ValueError) as e:
                c.sock.close()
                raise _wire.unavailable(self.socket_path, str(e)) from None
            self._give_back(c)
            return result
        raise _wire.unavailable(self.socket_path, "the connection failed twice")  # pragma: no cover

    # Operations.

    def ping(self) -> Dict[str, Any]:
        """The agent's version, protocol, lockdown state and read-audit mode."""
        return self.call({"op": "ping"})

    def get(self, provider: str, name: str, field: Optional[str] = None, *, allow_expired: bool = False) -> str:
        """A token as text: a raw secret, a token set's access token, or ``field``
        of a token set (``refresh_token``, ``id_token``, …)."""
        r = self.call(_wire.token_request("get", provider, name, field=field, allow_expired=allow_expired))
        return _wire.text_of(r, f"{provider}/{name}")

    def get_bytes(
        self, provider: str, name: str, field: Optional[str] = None, *, allow_expired: bool = False
    ) -> bytes:
        """As :meth:`get`, as bytes (for binary secrets)."""
        r = self.call(_wire.token_request("get", provider, name, field=field, allow_expired=allow_expired))
        return _wire.secret_of(r)[0]

    def get_with_meta(
        self, provider: str, name: str, field: Optional[str] = None, *, allow_expired: bool = False
    ) -> Dict[str, Any]:
        """``{"value": str, "meta": {...}}``: the token and its metadata (expiry,
        scopes, labels), as ``tokenguard get --json`` prints them."""
        r = self.call(
            _wire.token_request("get", provider, name, field=field, allow_expired=allow_expired, meta=True)
        )
        return {"value": _wire.text_of(r, f"{provider}/{name}"), "meta": r.get("meta")}

    def get_fresh(self, provider: str, name: str, field: Optional[str] = None) -> str:
        """As :meth:`get`, refreshed first by the agent when it is due (one refresh
        for every caller and process waiting on it)."""
        r = self.call(_wire.token_request("get_fresh", provider, name, field=field))
        return _wire.text_of(r, f"{provider}/{name}")

    def token_set(self, provider: str, name: str, *, allow_expired: bool = False) -> Dict[str, str]:
        """Every field of a token set (``access_token``, ``refresh_token``, …)."""
        r = self.call(_wire.token_request("token_set", provider, name, allow_expired=allow_expired))
        return {k: _wire.text_of(v, f"{provider}/{name} field {k}") for k, v in (r.get("fields") or {}).items()}

    def list(self, provider: Optional[str] = None) -> List[Dict[str, Any]]:
        """The tokens this caller may see (metadata only, never secrets)."""
        req: Dict[str, Any] = {"op": "list"}
        if provider is not None:
            req["provider"] = provider
        return list(self.call(req).get("tokens") or [])

    def status(self, provider: str, name: str) -> Dict[str, Any]:
        """``{"status": "active"|"expired"|"needs_reauth"|"revoked"|"shredded", …}``."""
        return self.call(_wire.token_request("status", provider, name))

    def put(
        self,
        provider: str,
        name: str,
        value: Any = None,
        *,
        token_set: Optional[Mapping[str, str]] = None,
        expires_at: Any = None,
        labels: Optional[Mapping[str, str]] = None,
        scopes: Optional[List[str]] = None,
        token_type: Optional[str] = None,
        overwrite: bool = True,
    ) -> Dict[str, Any]:
        """Stores a raw secret (``value``: str or bytes) or a ``token_set``;
        ``expires_at`` is unix seconds or a ``datetime``. Returns what was stored
        (``provider``, ``name``, ``replaced``, ``meta``)."""
        req = _wire.put_request(
            provider,
            name,
            value,
            token_set=token_set,
            expires_at=expires_at,
            labels=labels,
            scopes=scopes,
            token_type=token_type,
            overwrite=overwrite,
        )
        return self.call(req).get("stored") or {}

    def delete(self, provider: str, name: str) -> None:
        """Removes a token."""
        self.call(_wire.token_request("delete", provider, name))

    def revoke(self, provider: str, name: str, reason: str) -> Dict[str, Any]:
        """Revokes a token for good (upstream first, where the provider has a
        revocation endpoint)."""
        return self.call(_wire.token_request("revoke", provider, name, reason=reason))
