"""What the whole-process scripts share (kill_campaign.py, soak.py): the tokenguard
binary, a fresh SoftHSM2 token with its config in a temporary directory, and a
loopback OAuth token endpoint that answers every refresh with a new token set."""

import http.server
import json
import os
import shutil
import subprocess
import tempfile
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def binary():
    """TOKENGUARD_BIN, or target/release/tokenguard built now. Exported for
    softhsm-setup.sh, which then uses it instead of building its own."""
    tg = os.environ.get("TOKENGUARD_BIN")
    if not tg:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "tokenguard"], cwd=REPO, check=True)
        tg = os.path.join(REPO, "target/release/tokenguard")
    tg = os.path.abspath(tg)
    os.environ["TOKENGUARD_BIN"] = tg
    return tg


def run(prefix, body):
    """`body(tokenguard binary, work directory)` in a temporary directory removed
    afterwards; returns its exit code."""
    tg = binary()
    work = tempfile.mkdtemp(prefix=prefix)
    try:
        return body(tg, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fresh_token(work):
    """A new SoftHSM2 token and tokenguard config in `work` (softhsm-setup.sh --dir);
    returns the config's path."""
    subprocess.run([os.path.join(REPO, "softhsm-setup.sh"), "--dir", work], check=True, capture_output=True)
    return os.path.join(work, "tokenguard.toml")


class Endpoint:
    """A token endpoint on 127.0.0.1: each POST gets access and refresh tokens
    numbered by the request count, with `expires_in` seconds of life."""

    def __init__(self, expires_in):
        self.count = 0
        lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    outer.count += 1
                    n = outer.count
                body = json.dumps(
                    {"access_token": f"at-{n}", "refresh_token": f"rt-{n}", "expires_in": expires_in}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_to(self, config, provider, extra=""):
        """Appends `[providers.PROVIDER]` pointing at this endpoint to `config`."""
        with open(config, "a") as f:
            f.write(f'\n[providers.{provider}]\ntoken_url = "http://127.0.0.1:{self.server.server_port}/token"\n'
                    f'client_id = "{provider}-client"\n{extra}')

    def shutdown(self):
        self.server.shutdown()
