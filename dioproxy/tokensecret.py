"""The key that signs our tokens when ``auth.secret`` is not configured: made once, kept in the cache directory.

A key made at each start (or each reload) would log everyone out, and processes sharing one cache directory would
refuse each other's tokens. So the first process to need one writes it to ``token-secret`` (mode 0600) and every
process, now and after restarts, reads the same file.
"""

from __future__ import annotations

import contextlib
import os
import secrets

FILE = "token-secret"


def shared_secret(cache_dir: str) -> str:
    """The secret in ``cache_dir``, created there if it is missing (first writer wins: a hard link never replaces)."""
    path = os.path.join(cache_dir, FILE)
    with contextlib.suppress(FileNotFoundError):
        return _read(path)
    os.makedirs(cache_dir, exist_ok=True)
    temp = f"{path}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())  # no fsync (not on the reactor): a crash may leave it empty
    finally:
        os.close(fd)
    try:
        os.link(temp, path)
    except FileExistsError:
        pass  # another process was first: its secret is the one
    finally:
        os.unlink(temp)
    return _read(path)


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        secret = f.read().strip()
    if len(secret) < 32:
        raise ValueError(f"{path}: not a token secret (cut short by a crash?); remove it to have a new one made")
    return secret
