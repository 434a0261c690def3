"""Load for the soak test, run in its own process: N keep-alive connections looping over a request mix.

Each request line of the plan file is ``METHOD PATH EXPECTED_STATUS EXPECTED_LENGTH`` (length -1: any).
Prints one JSON object: requests and failures per status class, and the first few failures.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time


async def one_connection(host: str, port: int, plan: list[tuple], deadline: float, stats: dict) -> None:
    reader = writer = None
    while time.monotonic() < deadline:
        method, path, expected, length = random.choice(plan)
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            status_line = await asyncio.wait_for(reader.readline(), 30)
            status = int(status_line.split(b" ")[1])
            headers = {}
            while (line := await asyncio.wait_for(reader.readline(), 30)) not in (b"\r\n", b""):
                key, _, value = line.decode("latin-1").partition(":")
                headers[key.strip().lower()] = value.strip()
            size = int(headers.get("content-length", "0"))
            received = 0
            if method != "HEAD":
                while received < size:
                    chunk = await asyncio.wait_for(reader.read(min(1 << 20, size - received)), 30)
                    if not chunk:
                        break
                    received += len(chunk)
            ok = status == expected and (length < 0 or received == length)
            kind = "good" if expected < 400 else "bad"
            stats[kind] += 1
            if not ok:
                stats[kind + "_failed"] += 1
                if len(stats["examples"]) < 10:
                    stats["examples"].append(f"{method} {path}: {status} ({received} bytes)")
            if headers.get("connection", "").lower() == "close":
                writer.close()
                writer = None
        except (OSError, ValueError, IndexError, asyncio.TimeoutError) as e:
            stats["good_failed"] += 1
            if len(stats["examples"]) < 10:
                stats["examples"].append(f"{method} {path}: {type(e).__name__} {e}")
            if writer is not None:
                writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def main(host: str, port: int, plan_file: str, connections: int, seconds: float) -> None:
    with open(plan_file) as f:
        plan = [(m, p, int(s), int(n)) for m, p, s, n in (line.split() for line in f if line.strip())]
    stats = {"good": 0, "bad": 0, "good_failed": 0, "bad_failed": 0, "examples": []}
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(one_connection(host, port, plan, deadline, stats) for _ in range(connections)))
    print(json.dumps(stats))


if __name__ == "__main__":
    host, port, plan_file, connections, seconds = sys.argv[1:6]
    asyncio.run(main(host, int(port), plan_file, int(connections), float(seconds)))
