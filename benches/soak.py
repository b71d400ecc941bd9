#!/usr/bin/env python3
"""Soak: several CLI processes at once for a while, plus a long-running refresher.

    benches/soak.py [SECONDS]        (default 1800; CI runs 120)

On a fresh SoftHSM2 token (./softhsm-setup.sh in a temporary directory): 4 worker
processes loop over put (short-lived tokens), get, list, status, revoke, rotate-dek,
reencrypt and purge --expired, while `tokenguard refresh --watch` keeps a token set
fresh against a loopback OAuth endpoint. It checks: no unexpected failure, the
refresher's resident memory flat (the long-running library process), and the tokens
bounded (purge removes what expired). The file grows with the audit trail, which is
append-only by design (every CLI read is an event): the figures show both. Exits 1 on
a failed check.

TOKENGUARD_BIN=path uses that binary instead of building target/release/tokenguard.
"""

import json
import os
import random
import subprocess
import sys
import threading
import time

import harness
SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 1800.0
WORKERS = 4


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0




def soak(tg, work):
    config = harness.fresh_token(work)
    # Short lifetimes, so the watcher refreshes every few seconds.
    endpoint = harness.Endpoint(expires_in=4)
    endpoint.add_to(config, "acme")
    with open(config, "a") as f:
        f.write("[refresh]\nmargin_secs = 2\n")
    env = dict(os.environ, TOKENGUARD_CONFIG=config, RUST_LOG="off")
    store = os.path.join(work, "store", "tokens.redb")

    def run(args, stdin=b""):
        return subprocess.run([tg, *args], input=stdin, env=env, capture_output=True)

    for args, stdin in [(["init"], b""), (["put", "acme/svc"], b'{"access_token":"a","refresh_token":"r","expires_in":4}')]:
        r = run(args, stdin)
        if r.returncode != 0:
            sys.exit(f"setup {args}: {r.stderr.decode()}")
    watcher = subprocess.Popen([tg, "refresh", "--watch", "--interval", "1s"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + SECONDS
    errors = []
    ops = {}
    lock = threading.Lock()

    def worker(w):
        rng = random.Random(w)
        n = 0
        while time.monotonic() < deadline:
            n += 1
            p = f"w{w}"
            op = rng.choice(["put", "put", "put", "get", "list", "status", "revoke", "rotate", "reencrypt", "purge"])
            if op == "put":
                r = run(["put", f"{p}/t{n % 200}", "--expires-in", "2s"], f"v{n}".encode())
                ok = r.returncode == 0
            elif op == "get":
                r = run(["get", "acme/svc"])
                ok = r.returncode == 0
            elif op == "list":
                r = run(["list", p])
                ok = r.returncode == 0
            elif op == "status":
                r = run(["status", f"{p}/t{rng.randrange(200)}"])
                ok = r.returncode in (0, 3)  # 3: not stored (yet, or purged)
            elif op == "revoke":
                r = run(["revoke", f"{p}/t{rng.randrange(200)}", "--reason", "soak"])
                ok = r.returncode in (0, 3)
            elif op == "rotate":
                r = run(["rotate-dek", p])
                ok = r.returncode in (0, 3)  # 3: no data key yet
            elif op == "reencrypt":
                r = run(["reencrypt", p])
                ok = r.returncode == 0
            else:
                r = run(["purge", "--expired", "--revoked"])
                ok = r.returncode == 0
            with lock:
                ops[op] = ops.get(op, 0) + 1
                if not ok:
                    errors.append((op, r.returncode, r.stderr.decode().strip()[:200]))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    samples = []  # (elapsed, rss of the watcher, store size)
    start = time.monotonic()
    while any(t.is_alive() for t in threads):
        time.sleep(min(10.0, SECONDS / 12))
        samples.append((time.monotonic() - start, rss_kib(watcher.pid), os.path.getsize(store)))
    for t in threads:
        t.join()
    run(["purge", "--expired", "--revoked"])
    final_size = os.path.getsize(store)
    watcher.terminate()
    watch_code = watcher.wait(timeout=30)
    watch_err = watcher.stderr.read().decode()
    endpoint.shutdown()
    doctor = run(["doctor"])
    audit = run(["audit", "verify"])
    stats = json.loads(run(["stats", "--json"]).stdout or b"{}")

    warm = samples[len(samples) // 3:] or samples
    rss_first, rss_last = warm[0][1], warm[-1][1]
    mid_size = samples[len(samples) // 2][2] if samples else final_size
    print(f"soak: {SECONDS:.0f}s, {WORKERS} workers, {sum(ops.values())} CLI calls {ops}; "
          f"errors: {len(errors)}; refreshes served: {endpoint.count}; "
          f"refresher RSS {rss_first} -> {rss_last} KiB (after warm-up); "
          f"store {mid_size // 1024} KiB at half-time, {final_size // 1024} KiB at the end after purge "
          f"({stats.get('tokens')} tokens, {stats.get('audit_events')} audit events); "
          f"watch exit {watch_code}; doctor exit {doctor.returncode}; audit verify exit {audit.returncode}")
    for e in errors[:10]:
        print("ERROR", e)
    failed = (
        errors
        or watch_code != 0
        or "error" in watch_err.lower()
        or doctor.returncode != 0
        or audit.returncode != 0
        or rss_last > rss_first + 8 * 1024  # flat: under 8 MiB of growth after warm-up
        or stats.get("tokens", 10**9) > WORKERS * 200 + 1  # bounded: purge keeps up
        or endpoint.count == 0
    )
    if watch_err.strip():
        print("refresher stderr:", watch_err.strip()[:500])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(harness.run("tg-soak-", soak))
