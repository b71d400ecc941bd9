#!/usr/bin/env python3
"""The common design tokenguard replaces, written as fairly as we could: every
provider's tokens in one JSON document, encrypted with Fernet (AES-128-CBC +
HMAC-SHA256) under one key in a file. A store decrypts, edits, re-encrypts and
atomically rewrites the whole file; a read decrypts the whole file. Prints per-op
times at 10, 100, 1k and 10k tokens as JSON lines (see benches/compare.sh)."""
import json
import os
import sys
import tempfile
import time

from cryptography.fernet import Fernet


class FernetTokenManager:
    def __init__(self, path, key):
        self.path = path
        self.fernet = Fernet(key)

    def _load(self):
        try:
            with open(self.path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            return {}
        return json.loads(self.fernet.decrypt(blob))

    def _save(self, doc):
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.fernet.encrypt(json.dumps(doc).encode()))
            f.flush()
            os.fsync(f.fileno())  # tokenguard's puts are durable too
        os.replace(tmp, self.path)

    def put(self, provider, name, secret):
        doc = self._load()
        doc.setdefault(provider, {})[name] = secret
        self._save(doc)

    def put_many(self, provider, items):
        doc = self._load()
        doc.setdefault(provider, {}).update(items)
        self._save(doc)

    def get(self, provider, name):
        return self._load()[provider][name]


def secret(i):
    return f"ghp_{i:08}_compare_secret_value_padding_to_64_bytes_xxxxxxxxx"


def main():
    with tempfile.TemporaryDirectory() as d:
        for n in (10, 100, 1_000, 10_000):
            m = FernetTokenManager(os.path.join(d, f"tokens-{n}.fernet"), Fernet.generate_key())
            m.put_many("github", {f"t{i}": secret(i) for i in range(n)})
            gets = max(50, min(5_000, 2_000_000 // n))
            t = time.perf_counter()
            for k in range(gets):
                m.get("github", f"t{(k * 7919) % n}")
            get_us = (time.perf_counter() - t) * 1e6 / gets
            puts = max(20, min(200, 200_000 // n))
            t = time.perf_counter()
            for k in range(puts):
                m.put("github", f"t{(k * 7919) % n}", secret(k))
            put_us = (time.perf_counter() - t) * 1e6 / puts
            print(json.dumps({"impl": "fernet-json", "tokens": n, "get_us": round(get_us, 2), "put_us": round(put_us, 1)}))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
