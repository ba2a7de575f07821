"""The load side of `serve_load.py`: client processes that keep a number of connections busy against a server,
a shared request count, and the CPU seconds of a process tree."""
from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_process(url: str, requests: int, clients: int, images_per_request: int, image: bytes, sent,
                   route_tasks: int = 0) -> dict:
    """One load process: ``clients`` concurrent connections, each sending its next request as soon as it has an
    answer, until the load processes together have sent ``requests`` and ``sent[1]`` is 0 (``sent``: a shared
    array of the count and a hold that keeps the load going until a live add has reached the answers; one count
    for all processes: a process whose connections are answered faster sends more, so every connection stays busy
    to the end). ``route_tasks`` > 0: each request names one random task of ``task0`` .. (``?tasks=``), as
    requests for one product line each do. aiohttp, not httpx:
    httpx spends ~6 ms of CPU per multipart request (measured on this project's CPU host: 173 requests/s from
    one process; aiohttp 2,300 at 0.36 ms), so an httpx load generator measures itself, not the server."""
    import random

    import aiohttp

    rng = random.Random(os.getpid())
    latencies, errors, versions = [], [], set()
    cpu0 = time.process_time()

    def claim() -> bool:
        with sent.get_lock():
            if sent[0] >= requests and not sent[1]:
                return False
            sent[0] += 1
            return True

    async def client(session: aiohttp.ClientSession):
        while claim():
            form = aiohttp.FormData()
            for i in range(images_per_request):
                form.add_field("files", image, filename=f"img{i}.jpg", content_type="image/jpeg")
            t0 = time.perf_counter()
            try:
                params = {"tasks": f"task{rng.randrange(route_tasks)}"} if route_tasks else None
                async with session.post(f"{url}/predict", data=form, params=params) as r:
                    if r.status != 200:
                        errors.append(f"{r.status}: {(await r.text())[:200]}")
                    else:
                        versions.add((await r.json())["model_version"])
            except aiohttp.ClientError as exc:
                errors.append(repr(exc))
            latencies.append(time.perf_counter() - t0)

    span = []

    async def main():
        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            span.append(time.perf_counter())  # CLOCK_MONOTONIC: comparable across this host's processes
            await asyncio.gather(*(client(session) for _ in range(clients)))
            span.append(time.perf_counter())

    asyncio.run(main())
    return {"latencies": latencies, "errors": errors, "versions": sorted(versions),
            "cpu_s": time.process_time() - cpu0, "first": span[0], "last": span[1]}


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants, alive now (Linux /proc; 0 elsewhere)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    stats = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime+stime
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, (0, 0))[1]
        todo.extend(c for c, (ppid, _) in stats.items() if ppid == p)
    return total / ticks


_SENT = None


def init_sent(sent) -> None:
    global _SENT
    _SENT = sent


def start_client() -> None:
    import aiohttp  # noqa: F401 - imported before the clock starts


def client_in_worker(url: str, requests: int, clients: int, images_per_request: int, image: bytes,
                     route_tasks: int = 0) -> dict:
    return client_process(url, requests, clients, images_per_request, image, _SENT, route_tasks)


def shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
