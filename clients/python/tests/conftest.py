"""A real agent for these tests: clients/testing/agent-fixture.sh makes a fresh
SoftHSM2 token and store with the project's softhsm-setup.sh and starts
`tokenguard serve` on it (TOKENGUARD_BIN, default target/debug/tokenguard)."""

import os
import pathlib
import subprocess
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
FIXTURE = REPO / "clients" / "testing" / "agent-fixture.sh"


@pytest.fixture(scope="session")
def agent():
    d = tempfile.mkdtemp(prefix="tg-py-")
    try:
        out = subprocess.run([str(FIXTURE), "start", d], check=True, capture_output=True, text=True, timeout=120)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"the agent fixture failed:\n{e.stderr}") from None
    sock = out.stdout.strip().splitlines()[-1]
    yield {"socket": sock, "dir": d, "config": os.path.join(d, "tokenguard.toml")}
    subprocess.run([str(FIXTURE), "stop", d], check=False, timeout=30)
    log = pathlib.Path(d, "agent.log").read_text(errors="replace")
    assert "panicked" not in log, log
    subprocess.run(["rm", "-rf", d], check=False)


@pytest.fixture
def client(agent):
    from tokenguard_client import Client

    with Client(agent["socket"]) as c:
        yield c
