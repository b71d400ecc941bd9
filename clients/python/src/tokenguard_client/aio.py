"""The asyncio client: the same operations as :class:`tokenguard_client.Client`,
as coroutines, over connections reused from a small pool."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Dict, List, Mapping, Optional, Tuple

from . import _wire
from ._wire import TokenguardError

_Conn = Tuple[asyncio.StreamReader, asyncio.StreamWriter]


class AsyncClient:
    """A client of the tokenguard agent for asyncio programs.

    Arguments as for :class:`tokenguard_client.Client`. Any number of tasks may
    share one; each call uses a connection of its own for its request and answer,
    and at most ``pool_size`` are open at once.
    """

    def __init__(self, socket: Optional[str] = None, *, timeout: float = 10.0, pool_size: int = 8) -> None:
        self.socket_path = socket or _wire.find_socket()
        self.timeout = timeout
        self._pool_size = pool_size
        self._slots: Optional[asyncio.Semaphore] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._idle: List[_Conn] = []
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        return f"AsyncClient(socket={self.socket_path!r})"

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, w in idle:
            w.close()
        for _, w in idle:
            try:
                await w.wait_closed()
            except OSError:
                pass

    async def _connect(self) -> _Conn:
        try:
            return await asyncio.wait_for(asyncio.open_unix_connection(self.socket_path), self.timeout)
        except FileNotFoundError:
            raise _wire.unavailable(self.socket_path, "no socket there") from None
        except ConnectionRefusedError:
            raise _wire.unavailable(self.socket_path, "nothing listens on the socket") from None
        except PermissionError:
            raise _wire.unavailable(
                self.socket_path, "permission denied: this user may not connect (see [agent] socket_group)"
            ) from None
        except (OSError, asyncio.TimeoutError) as e:
            raise _wire.unavailable(self.socket_path, str(e) or e.__class__.__name__) from None

    async def call(self, req: Mapping[str, Any]) -> Any:
        """As :meth:`tokenguard_client.Client.call`."""
        loop = asyncio.get_running_loop()
        if self._slots is None or self._loop is not loop:
            # First use, or another event loop (a second asyncio.run): connections
            # and the semaphore belong to the loop that made them.
            self._loop = loop
            self._slots = asyncio.Semaphore(self._pool_size)
            self._idle = []
        async with self._slots:
            return await self._call(req)

    async def _take(self) -> Tuple[_Conn, bool]:
        while self._idle:
            conn = self._idle.pop()
            # The agent closes connections idle past its idle timeout.
            if not conn[0].at_eof() and not conn[1].is_closing():
                return conn, True
            conn[1].close()
        return await self._connect(), False

    async def _call(self, req: Mapping[str, Any]) -> Any:
        op = str(req.get("op"))
        for attempt in (0, 1):
            conn, reused = await self._take()
            reader, writer = conn
            want = next(self._ids)
            frame = _wire.encode({"v": _wire.VERSION, "id": want, **req})
            sent = False

            async def exchange() -> Any:
                nonlocal sent
                writer.write(frame)
                await writer.drain()
                sent = True
                header = await reader.readexactly(4)
                body = await reader.readexactly(_wire.frame_length(header))
                return _wire.decode(body, want)

            try:
                result = await asyncio.wait_for(exchange(), self.timeout)
            except TokenguardError as e:
                if getattr(e, "_untied", False):
                    writer.close()
                else:
                    self._give_back(conn)
                raise
            except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as e:
                writer.close()
                # Not sent whole: safe to send again whatever it is. Sent, and the
                # connection closed before an answer: only what changes nothing.
                if attempt == 0 and (not sent or (reused and op in _wire.IDEMPOTENT)):
                    continue
                raise _wire.unavailable(self.socket_path, f"the connection failed ({e.__class__.__name__})") from None
            except asyncio.TimeoutError:
                writer.close()
                raise _wire.unavailable(self.socket_path, f"no answer within {self.timeout} s") from None
            except (OSError, ValueError, RuntimeError) as e:
                writer.close()
                raise _wire.unavailable(self.socket_path, str(e)) from None
            self._give_back(conn)
            return result
        raise _wire.unavailable(self.socket_path, "the connection failed twice")  # pragma: no cover

    def _give_back(self, conn: _Conn) -> None:
        if len(self._idle) < self._pool_size:
            self._idle.append(conn)
        else:
            conn[1].close()

    async def ping(self) -> Dict[str, Any]:
        return await self.call({"op": "ping"})

    async def get(self, provider: str, name: str, field: Optional[str] = None, *, allow_expired: bool = False) -> str:
        r = await self.call(_wire.token_request("get", provider, name, field=field, allow_expired=allow_expired))
        return _wire.text_of(r, f"{provider}/{name}")

    async def get_bytes(
        self, provider: str, name: str, field: Optional[str] = None, *, allow_expired: bool = False
    ) -> bytes:
        r = await self.call(_wire.token_request("get", provider, name, field=field, allow_expired=allow_expired))
        return _wire.secret_of(r)[0]

    async def get_fresh(self, provider: str, name: str, field: Optional[str] = None) -> str:
        r = await self.call(_wire.token_request("get_fresh", provider, name, field=field))
        return _wire.text_of(r, f"{provider}/{name}")

    async def token_set(self, provider: str, name: str, *, allow_expired: bool = False) -> Dict[str, str]:
        r = await self.call(_wire.token_request("token_set", provider, name, allow_expired=allow_expired))
        return {k: _wire.text_of(v, f"{provider}/{name} field {k}") for k, v in (r.get("fields") or {}).items()}

    async def list(self, provider: Optional[str] = None) -> List[Dict[str, Any]]:
        req: Dict[str, Any] = {"op": "list"}
        if provider is not None:
            req["provider"] = provider
        return list((await self.call(req)).get("tokens") or [])

    async def status(self, provider: str, name: str) -> Dict[str, Any]:
        return await self.call(_wire.token_request("status", provider, name))

    async def get_with_meta(
        self, provider: str, name: str, field: Optional[str] = None, *, allow_expired: bool = False
    ) -> Dict[str, Any]:
        r = await self.call(
            _wire.token_request("get", provider, name, field=field, allow_expired=allow_expired, meta=True)
        )
        return {"value": _wire.text_of(r, f"{provider}/{name}"), "meta": r.get("meta")}

    async def put(self, provider: str, name: str, value: Any = None, **options: Any) -> Dict[str, Any]:
        """As :meth:`tokenguard_client.Client.put`."""
        return (await self.call(_wire.put_request(provider, name, value, **options))).get("stored") or {}

    async def delete(self, provider: str, name: str) -> None:
        await self.call(_wire.token_request("delete", provider, name))

    async def revoke(self, provider: str, name: str, reason: str) -> Dict[str, Any]:
        return await self.call(_wire.token_request("revoke", provider, name, reason=reason))
