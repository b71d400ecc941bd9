#!/usr/bin/env python3
"""Kill campaign: SIGKILL tokenguard CLI processes at uniformly random moments, from
process start to exit, and check that nothing acknowledged is lost.

    benches/kill_campaign.py [KILLS]          (default 200; CI runs 200)

TOKENGUARD_BIN=path uses that binary instead of building target/release/tokenguard.
KILL_SEED=n repeats a run.

On a fresh SoftHSM2 token made by ./softhsm-setup.sh in a temporary directory, it
mixes put, get, rotate-dek, reencrypt, revoke, refresh (against a loopback OAuth token
endpoint) and root add/remove. A process that exits 0 before its kill has
acknowledged its work. At the end it runs the documented repair
(./softhsm-setup.sh --repair: SoftHSM2 truncates its token file while a process logs
in, so a kill there empties it), then checks that every acknowledged write reads back,
and that `doctor` and `audit verify` pass. It prints the figures and exits 1 on any
loss or failed check.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import harness

KILLS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
# Each kill lands at a uniformly random moment between the process's start and the
# longest run of its operation seen so far (first guess below), so every moment from
# exec to exit is covered; processes that finish first acknowledge their work.
FIRST_GUESS = 0.030




def campaign(tg, work):
    setup = os.path.join(harness.REPO, "softhsm-setup.sh")
    config = harness.fresh_token(work)
    endpoint = harness.Endpoint(expires_in=3600)
    endpoint.add_to(config, "acme")
    soft = os.path.join(work, "recovery.toml")
    with open(soft, "w") as f:
        f.write(f'[[roots]]\nbackend = "soft"\nkey_file = "{work}/recovery.key"\n')
    env = dict(os.environ, TOKENGUARD_CONFIG=config, RUST_LOG="off")

    def run(args, stdin=b""):
        return subprocess.run([tg, *args], input=stdin, env=env, capture_output=True)

    def must(args, stdin=b""):
        r = run(args, stdin)
        if r.returncode != 0:
            sys.exit(f"setup step {args} failed ({r.returncode}): {r.stderr.decode()}")
        return r.stdout

    must(["init"])
    # Every provider gets its data key before any recovery root is added: a new data
    # key needs every pinned root configured (a symmetric recovery root is not; see
    # the recovery issue), so only rotate-dek meets that refusal below.
    for i in range(5):
        must(["put", f"p{i}/seed"], b"seed")
    must(["put", "acme/svc"], b'{"access_token":"at-0","refresh_token":"rt","expires_in":3600}')
    for i in range(50):
        must(["put", f"victims/v{i}"], b"to-revoke")

    def damaged():
        tokens = os.path.join(work, "tokens")
        return [t for t in os.listdir(tokens)
                if os.path.isdir(os.path.join(tokens, t)) and os.path.getsize(os.path.join(tokens, t, "token.object")) == 0]

    repairs = 0

    def repair_if_needed():
        # What an operator does when doctor names it: the documented repair.
        nonlocal repairs
        if damaged():
            r = subprocess.run([setup, "--dir", work, "--repair"], capture_output=True, text=True)
            repairs += r.stderr.count("repaired token")
            if damaged():
                sys.exit(f"the repair did not restore the token: {r.stderr}")

    acked = {}  # name -> value of every acknowledged put
    stats = {"kills": 0, "finished": 0, "killed": 0, "ops": {}}
    rng = random.Random(int(os.environ.get("KILL_SEED", time.time_ns())))
    victim = 0
    longest = {}  # op -> longest run seen, seconds
    killed_in_a_row = {}
    unexpected = []  # (op, exit code) of processes that failed without being killed
    n = 0
    while stats["kills"] < KILLS:
        n += 1
        repair_if_needed()
        op = rng.choice(["put", "put", "put", "get", "rotate", "reencrypt", "revoke", "refresh", "root"])
        stdin = b""
        name = value = None
        if op == "put":
            name, value = f"p{n % 5}/t{n}", f"value-{n}-{rng.getrandbits(32):08x}"
            args, stdin = ["put", name], value.encode()
        elif op == "get":
            args = ["get", "p0/seed"]
        elif op == "rotate":
            args = ["rotate-dek", f"p{n % 5}"]
        elif op == "reencrypt":
            args = ["reencrypt"]
        elif op == "revoke":
            args = ["revoke", f"victims/v{victim % 50}", "--reason", "kill campaign"]
            victim += 1
        elif op == "refresh":
            args = ["refresh", "acme/svc"]
        else:
            pinned = json.loads(must(["root", "list", "--json"]))
            soft_roots = [r for r in pinned if r["identity"].startswith("soft:")]
            args = ["root", "remove", str(soft_roots[0]["root_id"])] if soft_roots else ["root", "add", "--root-config", soft]
        stats["ops"][op] = stats["ops"].get(op, 0) + 1
        p = subprocess.Popen([tg, *args], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env)
        try:
            p.stdin.write(stdin)
            p.stdin.close()
        except BrokenPipeError:
            pass
        started = time.monotonic()
        time.sleep(rng.uniform(0, longest.get(op, FIRST_GUESS)))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            stats["kills"] += 1
        code = p.wait()
        if code != -signal.SIGKILL:
            longest[op] = max(longest.get(op, 0), time.monotonic() - started)
            killed_in_a_row[op] = 0
        else:
            # An operation killed every time never shows how long it runs: widen
            # its window so its commit, too, gets hit.
            killed_in_a_row[op] = killed_in_a_row.get(op, 0) + 1
            if killed_in_a_row[op] >= 3:
                longest[op] = longest.get(op, FIRST_GUESS) * 1.5
                killed_in_a_row[op] = 0
        # rotate-dek may meet "no data key yet" (3) or the pinned recovery root that is
        # not configured here (8): refusals, not failures.
        if code not in (0, -signal.SIGKILL) and not (op == "rotate" and code in (3, 8)):
            unexpected.append((op, code))
        if code == 0:
            stats["finished"] += 1
            if op == "put":
                acked[name] = value
        elif code == -signal.SIGKILL:
            stats["killed"] += 1

    # The documented repair, then the checks.
    repair_if_needed()
    repaired = repairs
    lost = []
    for name, value in acked.items():
        r = run(["get", name])
        if r.returncode != 0 or r.stdout.decode() != value:
            lost.append((name, r.returncode, r.stderr.decode().strip()[:200]))
    doctor = run(["doctor"])
    audit = run(["audit", "verify"])
    endpoint.shutdown()
    print(
        f"kills: {stats['kills']} of {n} processes (the others finished first: {stats['finished']}); "
        f"acknowledged writes: {len(acked)}; lost: {len(lost)}; unexpected failures: {len(unexpected)}; "
        f"token repairs needed: {repaired}; "
        f"doctor exit {doctor.returncode}; audit verify exit {audit.returncode}; ops {stats['ops']}"
    )
    for item in lost[:10]:
        print("LOST", item)
    if doctor.returncode != 0:
        print(doctor.stdout.decode(), doctor.stderr.decode())
    if audit.returncode != 0:
        print(audit.stdout.decode(), audit.stderr.decode())
    for item in unexpected[:10]:
        print("UNEXPECTED", item)
    ok = not lost and not unexpected and doctor.returncode == 0 and audit.returncode == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(harness.run("tg-kills-", campaign))
