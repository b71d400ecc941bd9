"""The Python client against a real agent on a real SoftHSM2 token."""

import asyncio
import os
import socket
import subprocess
import threading
import time

import pytest

from tokenguard_client import (
    AsyncClient,
    Client,
    ExpiredOrRevoked,
    InvalidRequest,
    NotFound,
    RateLimited,
    Refused,
    TokenguardError,
    Unavailable,
    find_socket,
)
from tokenguard_client import _wire

SECRET = "ghp_py_client_0123456789abcdef"


def test_a_raw_secret_round_trips_as_text_and_bytes(client):
    stored = client.put("github", "py-ci", SECRET, labels={"team": "platform"})
    assert stored["provider"] == "github" and stored["name"] == "py-ci"
    assert client.get("github", "py-ci") == SECRET
    assert client.get_bytes("github", "py-ci") == SECRET.encode()
    got = client.get_with_meta("github", "py-ci")
    assert got["value"] == SECRET and got["meta"]["labels"] == {"team": "platform"}
    assert any(t["name"] == "py-ci" for t in client.list("github"))
    assert all(SECRET not in repr(t) for t in client.list())
    assert client.status("github", "py-ci")["status"] == "active"


def test_binary_secrets_travel_in_base64_and_get_says_to_use_get_bytes(client):
    blob = bytes(range(256))
    client.put("jira", "py-binary", blob)
    assert client.get_bytes("jira", "py-binary") == blob
    with pytest.raises(InvalidRequest, match="get_bytes"):
        client.get("jira", "py-binary")


def test_token_sets_give_every_field_and_one_field_on_request(client):
    fields = {"access_token": "ya29.py-access", "refresh_token": "1//py-refresh", "id_token": "eyJ.py"}
    client.put("google", "py-svc", token_set=fields, scopes=["email"], token_type="Bearer")
    assert client.token_set("google", "py-svc") == fields
    assert client.get("google", "py-svc") == "ya29.py-access"
    assert client.get("google", "py-svc", field="refresh_token") == "1//py-refresh"
    # Not due for a refresh: get_fresh serves the stored access token.
    assert client.get_fresh("google", "py-svc") == "ya29.py-access"
    with pytest.raises(NotFound):
        client.get("google", "py-svc", field="no_such_field")


def test_each_error_kind_has_its_exception_and_exit_code(client):
    with pytest.raises(NotFound) as e:
        client.get("github", "py-missing")
    assert e.value.kind == "not_found" and e.value.exit_code == 3
    # No rule covers this provider: refused, whether or not the token exists.
    with pytest.raises(Refused) as e:
        client.get("stripe", "live")
    assert e.value.exit_code == 9
    with pytest.raises(InvalidRequest):
        client.get("github", "not a name")
    # Expired: refused unless asked for; revoked: for good.
    client.put("slack", "py-old", "xoxb-old", expires_at=int(time.time()) - 60)
    with pytest.raises(ExpiredOrRevoked) as e:
        client.get("slack", "py-old")
    assert e.value.kind == "expired" and e.value.exit_code == 7
    assert client.get("slack", "py-old", allow_expired=True) == "xoxb-old"
    client.put("slack", "py-bot", "xoxb-live")
    client.revoke("slack", "py-bot", "rotated by the python test")
    with pytest.raises(ExpiredOrRevoked) as e:
        client.get("slack", "py-bot")
    assert e.value.kind == "revoked"
    # A second put of an existing name with overwrite=False is refused.
    client.put("slack", "py-dup", "xoxb-first")
    with pytest.raises(TokenguardError) as dup:
        client.put("slack", "py-dup", "xoxb-second", overwrite=False)
    assert client.get("slack", "py-dup") == "xoxb-first"
    # Secrets never reach an error message.
    for exc in (e.value, dup.value):
        assert "xoxb" not in str(exc) and "xoxb" not in repr(exc)


def test_over_its_rate_a_caller_is_limited_and_told_when_to_retry(client):
    # limited/* allows 1 request per second, burst 2.
    client.put("limited", "py-rate", "value-rate")
    with pytest.raises(RateLimited) as e:
        for _ in range(5):
            client.get("limited", "py-rate")
    assert e.value.exit_code == 10 and 0 < e.value.retry_after <= 2.0
    time.sleep(e.value.retry_after + 0.05)
    assert client.get("limited", "py-rate") == "value-rate"


def test_an_absent_agent_is_unavailable_with_its_exit_code(tmp_path):
    c = Client(str(tmp_path / "no.sock"), timeout=1.0)
    with pytest.raises(Unavailable) as e:
        c.get("github", "x")
    assert e.value.exit_code == 11 and "no socket there" in str(e.value)
    # Something that is not the agent and closes at once.
    path = str(tmp_path / "mute.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def close_at_once():
        conn, _ = srv.accept()
        conn.recv(10)
        conn.close()

    t = threading.Thread(target=close_at_once)
    t.start()
    with pytest.raises(Unavailable):
        Client(path, timeout=2.0).ping()
    t.join()
    srv.close()


def test_one_client_serves_many_threads_on_a_bounded_pool(client):
    for i in range(8):
        client.put("bench", f"py-t{i}", f"value-{i}")
    errors = []

    def worker(k):
        try:
            for j in range(150):
                i = (j + k) % 8
                assert client.get("bench", f"py-t{i}") == f"value-{i}"
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert 1 <= len(client._idle) <= 8


def test_writes_and_reads_after_the_agent_closed_idle_connections_succeed(client):
    # The fixture's agent closes connections idle for 1.5 s.
    client.put("bench", "py-idle", "value-1")
    time.sleep(2.0)
    client.put("bench", "py-idle", "value-2")
    time.sleep(2.0)
    assert client.get("bench", "py-idle") == "value-2"
    # A connection that fails while the request is being sent: the agent cannot
    # have acted on it, so even a write goes out once more on a fresh connection.
    for c in client._idle:
        c.sock.shutdown(socket.SHUT_WR)
    client.put("bench", "py-idle", "value-3")
    assert client.get("bench", "py-idle") == "value-3"


def test_a_forked_child_never_shares_its_parents_connections(client):
    client.put("bench", "py-fork-parent", "parent-value")
    client.put("bench", "py-fork-child", "child-value")
    assert client.get("bench", "py-fork-parent") == "parent-value"
    assert client._idle, "the parent has a pooled connection to hand down"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        ok = all(client.get("bench", "py-fork-child") == "child-value" for _ in range(200))
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    for _ in range(200):
        assert client.get("bench", "py-fork-parent") == "parent-value"
    assert os.read(r, 1) == b"1", "the child read a wrong value"
    os.close(r)
    assert os.waitpid(pid, 0)[1] == 0


class FakeAgent:
    """A socket that answers each request with whatever `answer(id)` returns."""

    def __init__(self, path, answer):
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(path)
        self.srv.listen(8)
        self.answer = answer
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        import json
        import struct

        while True:
            head = conn.recv(4, socket.MSG_WAITALL)
            if len(head) < 4:
                return
            body = conn.recv(struct.unpack(">I", head)[0], socket.MSG_WAITALL)
            out = self.answer(json.loads(body)["id"])
            if out is None:
                return
            try:
                conn.sendall(out)
            except OSError:
                return

    def close(self):
        self.srv.close()


def frame(obj):
    import json
    import struct

    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    "answer, what",
    [
        (lambda i: b"\xff\xff\xff\xff", "a length prefix over the limit"),
        (lambda i: frame({"v": 1, "id": i + 1000, "ok": True, "result": {}}), "an answer to another request"),
        (lambda i: frame([1, 2]), "an answer that is not an object"),
        (lambda i: b"\x00\x00\x00\x05{", "an answer cut short"),
    ],
)
def test_a_misbehaving_peer_is_unavailable_and_its_connection_dropped(tmp_path, answer, what):
    fake = FakeAgent(str(tmp_path / "fake.sock"), answer)
    c = Client(str(tmp_path / "fake.sock"), timeout=1.0)
    with pytest.raises(Unavailable):
        c.ping()
    assert c._idle == [], what
    fake.close()


def test_an_error_not_tied_to_a_request_drops_the_connection_and_a_late_answer_is_never_taken(tmp_path):
    untied = frame({"v": 1, "ok": False, "error": {"kind": "unavailable", "message": "too many", "exit_code": 11}})
    fake = FakeAgent(str(tmp_path / "u.sock"), lambda i: untied)
    c = Client(str(tmp_path / "u.sock"), timeout=1.0)
    with pytest.raises(Unavailable, match="too many"):
        c.ping()
    assert c._idle == []
    fake.close()
    # An answer that comes after the timeout: the connection is dropped, so the
    # next request never reads it as its own.
    slow = {"n": 0}

    def late(i):
        slow["n"] += 1
        if slow["n"] == 1:
            time.sleep(1.5)
        return frame({"v": 1, "id": i, "ok": True, "result": {"n": slow["n"]}})

    fake = FakeAgent(str(tmp_path / "late.sock"), late)
    c = Client(str(tmp_path / "late.sock"), timeout=1.0)
    with pytest.raises(Unavailable, match="no answer"):
        c.ping()
    assert c._idle == []
    assert c.ping() == {"n": 2}
    fake.close()


def test_errors_survive_pickling_for_process_pools():
    import pickle

    e = RateLimited("rate_limited", "slow down", hint="wait", exit_code=10, retry_after_ms=250)
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is RateLimited and back.retry_after == 0.25 and back.hint == "wait" and back.exit_code == 10


def test_the_asyncio_client_serves_concurrent_tasks(agent):
    async def main():
        async with AsyncClient(agent["socket"]) as c:
            await c.put("bench", "py-async", "value-async")
            got = await asyncio.gather(*(c.get("bench", "py-async") for _ in range(50)))
            assert got == ["value-async"] * 50
            with pytest.raises(NotFound):
                await c.get("bench", "py-async-missing")
            assert (await c.token_set("google", "py-svc"))["refresh_token"] == "1//py-refresh"

    asyncio.run(main())

    # The same client from a second event loop: it starts afresh there.
    shared = AsyncClient(agent["socket"])

    async def once():
        return await shared.get("bench", "py-async")

    assert asyncio.run(once()) == "value-async"
    assert asyncio.run(once()) == "value-async"


def test_the_socket_is_found_as_the_cli_finds_it(agent, monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENGUARD_SOCKET", "/run/x/env.sock")
    assert find_socket() == "/run/x/env.sock"
    monkeypatch.delenv("TOKENGUARD_SOCKET")
    monkeypatch.setenv("TOKENGUARD_CONFIG", agent["config"])
    assert find_socket() == agent["socket"]
    assert Client().ping()["protocol"] == 1
    cfg = tmp_path / "c.toml"
    cfg.write_text('[store]\npath = "/x"\n[agent]\n# comment\nsocket = "/run/y/agent.sock"  # trailing\n')
    monkeypatch.setenv("TOKENGUARD_CONFIG", str(cfg))
    assert find_socket() == "/run/y/agent.sock"
    monkeypatch.setenv("TOKENGUARD_CONFIG", str(tmp_path / "none.toml"))
    assert find_socket() == "/run/tokenguard/agent.sock"
    # As the CLI: $XDG_CONFIG_HOME first, and a relative socket is relative to the file.
    monkeypatch.delenv("TOKENGUARD_CONFIG")
    xdg = tmp_path / "xdg"
    (xdg / "tokenguard").mkdir(parents=True)
    (xdg / "tokenguard" / "tokenguard.toml").write_text('[agent]\nsocket = "run/agent.sock"\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    assert find_socket() == str(xdg / "tokenguard" / "run" / "agent.sock")


def test_the_line_reader_for_old_pythons_reads_only_agent_socket():
    text = '[store]\nsocket = "/wrong"\n[agent]\nsocket_group = "x"\nsocket = "/run/a b/\\"q\\".sock"\n'
    assert _wire.scan_socket(text) == '/run/a b/"q".sock'
    assert _wire.scan_socket("[agent]\nsocket = '/run/literal.sock'\n") == "/run/literal.sock"
    assert _wire.scan_socket('[agent.allow]\nsocket = "/no"\n') is None
    assert _wire.scan_socket('[agent]\nx = 1\n[[agent.allow]]\nsocket = "/no"\n') is None
    assert _wire.scan_socket('agent.socket = "/dotted.sock"\n[store]\n') == "/dotted.sock"


def test_the_cli_and_the_client_see_the_same_token(agent, client):
    client.put("github", "py-cli", "value-shared")
    bin_ = os.environ.get("TOKENGUARD_BIN") or str(
        __import__("pathlib").Path(__file__).resolve().parents[3] / "target" / "debug" / "tokenguard"
    )
    env = dict(os.environ, TOKENGUARD_SOCKET=agent["socket"])
    env.pop("TOKENGUARD_CONFIG", None)
    out = subprocess.run([bin_, "get", "github/py-cli"], env=env, capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"value-shared"
