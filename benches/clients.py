#!/usr/bin/env python3
"""The Python client in one run beside what it replaces (benches/clients.sh starts the
agents and passes their sockets):

- `get` from the Python client through the agent, with durable read audit and with
  read audit off: p50/p99 latency from one thread, and throughput from 1 and 8
  threads sharing one Client;
- the Fernet JSON-file design (benches/fernet_reference.py) at 10, 100, 1,000 and
  10,000 tokens, in process, from 1 and 8 threads;
- the CLI's `get` through the agent (a process per read).

Prints a Markdown table. Usage: clients.py DURABLE_SOCKET OFF_SOCKET TOKENGUARD_BIN
"""

import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "clients" / "python" / "src"))
sys.path.insert(0, str(HERE))

from tokenguard_client import Client  # noqa: E402

try:
    from cryptography.fernet import Fernet  # noqa: E402

    from fernet_reference import FernetTokenManager, secret  # noqa: E402
except ImportError:  # pragma: no cover - the bench says what to install
    sys.exit("benches/clients.py needs the `cryptography` package for the Fernet reference: pip install cryptography")


def percentiles(f, n):
    t = []
    for i in range(n):
        s = time.perf_counter()
        f(i)
        t.append(time.perf_counter() - s)
    t.sort()
    return t[n // 2] * 1e6, t[n * 99 // 100] * 1e6


def throughput(f, threads, per_thread):
    def run(k):
        for i in range(per_thread):
            f(k * per_thread + i)

    ts = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    s = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return threads * per_thread / (time.perf_counter() - s)


def row(what, p50, p99, t1, t8):
    print(f"| {what} | {p50:,.0f} | {p99:,.0f} | {t1:,.0f} | {t8:,.0f} |")


def main():
    durable_sock, off_sock, tg_bin = sys.argv[1:4]
    print("| what | get p50 µs | get p99 µs | gets/s, 1 thread | gets/s, 8 threads |")
    print("|---|---|---|---|---|")
    for label, sock in (("Python client, durable read audit", durable_sock), ("Python client, read audit off", off_sock)):
        c = Client(sock)
        for i in range(100):
            c.put("bench", f"t{i:03}", secret(i))
        get = lambda i: c.get("bench", f"t{i % 100:03}")  # noqa: E731
        for i in range(200):
            get(i)
        p50, p99 = percentiles(get, 3000)
        row(label, p50, p99, throughput(get, 1, 2000), throughput(get, 8, 500))
        c.close()
    with tempfile.TemporaryDirectory() as d:
        for n in (10, 100, 1_000, 10_000):
            m = FernetTokenManager(os.path.join(d, f"tokens-{n}.fernet"), Fernet.generate_key())
            m.put_many("github", {f"t{i}": secret(i) for i in range(n)})
            get = lambda i: m.get("github", f"t{i % n}")  # noqa: E731
            reps = max(20, min(3000, 300_000 // n))
            p50, p99 = percentiles(get, reps)
            row(f"Fernet JSON file, {n:,} tokens", p50, p99, throughput(get, 1, reps), throughput(get, 8, max(3, reps // 8)))
    env = dict(os.environ, TOKENGUARD_SOCKET=durable_sock)
    env.pop("TOKENGUARD_CONFIG", None)

    def cli(i):
        out = subprocess.run([tg_bin, "get", f"bench/t{i % 100:03}"], env=env, capture_output=True)
        if out.returncode != 0:
            raise RuntimeError(out.stderr.decode(errors="replace"))

    p50, p99 = percentiles(cli, 100)
    row("CLI `get` through the agent (durable), a process per read", p50, p99, throughput(cli, 1, 100), throughput(cli, 8, 25))


if __name__ == "__main__":
    main()
