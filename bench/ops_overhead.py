"""Benchmark: what observing a request costs nar-bridge (issue 18: access lines, metrics).

In one process, a narinfo-sized request goes through a handler alone (the
peer: what the bridge did before) and through :func:`nixcas.ops.web.observe`
plus :class:`nixcas.ops.web.AccessLogger` (what the bridge does now: route,
in-flight gauge, counters and histogram, one access line written to a file),
in alternating rounds; each figure is the best round (a busy machine only ever
adds).  Also with the level at ``warning`` (no access line: metrics only) and
with the line going through :mod:`logging` (another handler on the root
logger: the access line cannot be written directly).  Socket, HTTP parsing and
the store are left out: they are the same on both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from nixcas.ops import logs
from nixcas.ops import web as ops_web


async def get_narinfo(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b"x" * 400, headers={"Content-Type": "text/x-nix-narinfo"})


async def best_of(fn: Callable[[], Awaitable[None]], rounds: int, n: int) -> float:
    """The fastest of ``rounds`` rounds of ``n`` calls, in microseconds per call."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            await fn()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


async def measure(rounds: int, n: int, log_file: Path) -> dict[str, float]:
    app = web.Application()
    app.router.add_get("/{name}.narinfo", get_narinfo)
    request = make_mocked_request("GET", "/z9ziz7ipnh5x6xdw46pb1wdlw0ss1m78.narinfo", app=app)
    request._match_info = await app.router.resolve(request)
    access = ops_web.AccessLogger(ops_web.access_log, "")

    async def plain() -> None:
        await get_narinfo(request)

    async def observed() -> None:
        response = await ops_web.observe(request, get_narinfo)
        access.log(request, response, 0.0001)

    root = logging.getLogger()
    results: dict[str, list[float]] = {}
    with log_file.open("w") as stream:
        for _ in range(3):
            for name, level, extra_handler, fn in (
                ("handler alone (peer)", "info", False, plain),
                ("observed, access line", "info", False, observed),
                ("observed, access line through logging", "info", True, observed),
                ("observed, --log-level warning", "warning", False, observed),
            ):
                logs.configure(logs.LogOptions(level=level), server=True, stream=stream)
                other = logging.NullHandler()
                if extra_handler:
                    root.addHandler(other)
                try:
                    results.setdefault(name, []).append(await best_of(fn, rounds, n))
                finally:
                    root.removeHandler(other)
    return {name: min(values) for name, values in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=3000, help="per round")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = asyncio.run(measure(args.rounds, args.requests, Path(tmp) / "access.log"))
    peer = figures["handler alone (peer)"]
    for name, value in figures.items():
        print(f"{name:<42} {value:7.1f} µs/request  (+{value - peer:.1f})")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
