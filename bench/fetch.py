"""A blob client for timing: ``python -m bench.fetch URL --clients N`` prints one JSON object with every download.

Why not curl's ``time_starttransfer``: it stops at the first byte of the *headers*, and a proxy that answers
headers at once but body bytes only after the whole download would look like it streams. This client times the
first byte of the *body*, checks the status, the length and the sha256 of what arrived (a fast wrong answer is not
fast), and starts all its clients at one barrier. It runs as its own process so the process under test, and the
benchmark itself, are not the ones reading.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import threading
import time
from urllib.parse import urlsplit

BUFFER = 1024 * 1024


def download(url: str, barrier: threading.Barrier, expect_digest: str | None) -> dict:
    parts = urlsplit(url)
    barrier.wait()
    started = time.monotonic()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    first = None
    size = 0
    sha = hashlib.sha256() if expect_digest else None
    try:
        connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        response = connection.getresponse()
        status = response.status
        # One byte first: readinto() would wait for a whole buffer (1 MiB), not for the first byte of the body.
        view = memoryview(response.read(1))
        if view:
            first = time.monotonic()
        buffer = bytearray(BUFFER)
        while view:
            size += len(view)
            if sha is not None:
                sha.update(view)
            view = memoryview(buffer)[: response.readinto(buffer)]
        error = None
    except (OSError, http.client.HTTPException) as e:
        status, error = 0, f"{type(e).__name__}: {e}"
    finally:
        connection.close()
    ended = time.monotonic()
    result = {
        "status": status,
        "bytes": size,
        "ttfb": (first - started) if first is not None else None,
        "total": ended - started,
        "start": started,
        "end": ended,
        "error": error,
    }
    if sha is not None:
        result["digest_ok"] = "sha256:" + sha.hexdigest() == expect_digest
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--digest", help="check the body's sha256 against this digest")
    args = parser.parse_args()
    barrier = threading.Barrier(args.clients)
    results: list[dict] = [{} for _ in range(args.clients)]

    def run(i: int) -> None:
        results[i] = download(args.url, barrier, args.digest)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    begin = min(r["start"] for r in results)
    print(json.dumps({"wall": max(r["end"] for r in results) - begin, "clients": results}))


if __name__ == "__main__":
    main()
