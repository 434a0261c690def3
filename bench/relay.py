"""A far upstream on one machine: a TCP relay that caps the upstream→client bandwidth, shared by all connections.

Loopback moves gigabytes per second, so a cold pull through a proxy on it tells nothing about streaming: the fill
is over before the first client byte could be measured. Docker Hub is tens of MB/s away. This relay sits between a
proxy and the upstream registry and lets the response bytes through at ``--rate`` bytes per second *in total* (one
token bucket for every connection, like one WAN link), so 16 proxied downloads of one blob share the link, just as
they would for real. Requests (client→upstream) pass unthrottled; no latency is added.

It runs as its own process (``python -m bench.relay``) so that its CPU time is not charged to the benchmark
process nor to the proxy under test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

CHUNK = 64 * 1024


class Link:
    """A shared token bucket as a virtual clock: each chunk is scheduled after the previous one at ``rate``.

    ``burst`` is the catch-up credit. A real link goes on delivering into the receiver's socket buffer while a process
    waits for a core; this relay is a process, and on a busy machine it is descheduled for milliseconds at a time.
    With a credit of one chunk it lost that time for good (measured: 0.9-3.3 s per 16-client round of scenario 8, which
    then timed the relay, not the proxy). 4 MiB, about the receive window Linux autotunes to, lets it catch up after
    such a pause and gives a link that was idle at most that much head start, the same for every proxy measured.
    """

    def __init__(self, rate: float, burst: int = 4 * 1024 * 1024) -> None:
        self.rate = rate
        self.burst_seconds = burst / rate
        self.free_at = 0.0

    async def take(self, size: int) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.free_at = max(self.free_at, now - self.burst_seconds) + size / self.rate
        delay = self.free_at - now
        if delay > 0:
            await asyncio.sleep(delay)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link | None) -> None:
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            if link is not None:
                await link.take(len(data))
            writer.write(data)
            await writer.drain()  # backpressure: a slow proxy slows the upstream read, as TCP would
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.write_eof()


async def serve(listen_port: int, target_host: str, target_port: int, rate: float) -> None:
    link = Link(rate)

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(target_host, target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pump(client_reader, up_writer, None), _pump(up_reader, client_writer, link))
        for writer in (client_writer, up_writer):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    print(f"relay 127.0.0.1:{listen_port} -> {target_host}:{target_port} at {rate / 1e6:.1f} MB/s", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--target", required=True, help="HOST:PORT of the upstream")
    parser.add_argument("--rate", type=float, required=True, help="bytes per second, upstream to client, in total")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen_port, host, int(port), args.rate))


if __name__ == "__main__":
    main()
