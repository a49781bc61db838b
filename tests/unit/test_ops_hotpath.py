"""The per-request work of a served narinfo: access lines held for one loop iteration, metrics, the point read."""

from __future__ import annotations

import asyncio
import io
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from nixcas._sqlite import Busy
from nixcas.errors import StorageError
from nixcas.ops import logs
from nixcas.ops.logs import LogOptions
from nixcas.ops.metrics import HttpMetrics, _Values
from nixcas.store.pathinfo.sqlite import SqlitePathInfoService


class CountingStream(io.StringIO):
    """A text stream that counts its writes."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def stream() -> Iterator[CountingStream]:
    """The root logger set up as a server's, writing into the yielded stream alone; restored afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    for handler in handlers:
        root.removeHandler(handler)
    out = CountingStream()
    logs.configure(LogOptions(), server=True, stream=out)
    yield out
    logs.configure(LogOptions())
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


ACCESS = logging.getLogger("nixcas.access")


def only_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our handler alone on the root logger (pytest adds its own for each phase of a test)."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [logs._handler])


async def test_held_lines_go_out_together_at_the_next_loop_iteration(
    stream: CountingStream, monkeypatch: pytest.MonkeyPatch
) -> None:
    only_ours(monkeypatch)
    loop = asyncio.get_running_loop()
    for n in range(3):
        assert logs.write_directly(ACCESS, logging.INFO, f"line {n}", loop)
    assert stream.getvalue() == ""  # held for now
    await asyncio.sleep(0)
    lines = stream.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["line 0", "line 1", "line 2"]
    assert all(" INFO nixcas.access: " in line for line in lines)
    assert stream.writes == 1
    logs.flush_pending()  # nothing held: nothing written
    assert stream.writes == 1


async def test_any_other_line_writes_the_held_ones_first(
    stream: CountingStream, monkeypatch: pytest.MonkeyPatch
) -> None:
    only_ours(monkeypatch)
    loop = asyncio.get_running_loop()
    logs.write_directly(ACCESS, logging.INFO, "held 1", loop)
    logging.getLogger("nixcas.other").warning("through logging")
    logs.write_directly(ACCESS, logging.INFO, "held 2", loop)
    logs.write_directly(ACCESS, logging.INFO, "at once")
    messages = [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()]
    assert messages == ["held 1", "through logging", "held 2", "at once"]
    await asyncio.sleep(0)  # the scheduled write finds nothing left
    assert len(stream.getvalue().splitlines()) == 4


async def test_a_flush_of_the_handler_writes_the_held_lines(
    stream: CountingStream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``logging.shutdown`` flushes every handler: at exit, and in a failing command before its ``os._exit``
    (which skips the event loop's next iteration and every atexit function)."""
    only_ours(monkeypatch)
    logs.write_directly(ACCESS, logging.INFO, "held", asyncio.get_running_loop())
    assert stream.getvalue() == ""
    assert logs._handler is not None
    logs._handler.flush()
    assert stream.getvalue().endswith("nixcas.access: held\n")


async def test_configure_writes_held_lines_to_the_stream_they_were_meant_for(
    stream: CountingStream, monkeypatch: pytest.MonkeyPatch
) -> None:
    only_ours(monkeypatch)
    logs.write_directly(ACCESS, logging.INFO, "before the switch", asyncio.get_running_loop())
    other = io.StringIO()
    logs.configure(LogOptions(), server=True, stream=other)
    assert stream.getvalue().endswith("nixcas.access: before the switch\n")
    assert other.getvalue() == ""


def _sample(name: str, route: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, {"route": route, **labels})
    return 0.0 if value is None else value


LE = ("0.0005", "0.001", "0.005", "300.0")
"""Some bucket bounds of the duration histogram, as their ``le`` labels."""


def test_http_metrics_count_as_prometheus_methods_would() -> None:
    route = "hotpath_test_route"
    metrics = HttpMetrics()
    # on a bound (counted in that bucket), between two, above every finite bound, zero
    for seconds, sent in ((0.0005, 10), (0.0007, 20), (400.0, 0), (0.0, 5)):
        metrics.record(route, "GET", 200, seconds, 0, sent)
    metrics.record(route, "PUT", 201, 0.003, 7, 0)
    assert _sample("nixcas_http_requests_total", route, method="GET", status="200") == 4
    assert _sample("nixcas_http_requests_total", route, method="PUT", status="201") == 1
    assert _sample("nixcas_http_request_duration_seconds_count", route) == 5
    assert _sample("nixcas_http_request_duration_seconds_sum", route) == pytest.approx(400.0042)
    le = {bound: _sample("nixcas_http_request_duration_seconds_bucket", route, le=bound) for bound in LE}
    assert le["0.0005"] == 2  # 0.0 and 0.0005
    assert le["0.001"] == 3
    assert le["0.005"] == 4
    assert le["300.0"] == 4
    assert _sample("nixcas_http_request_duration_seconds_bucket", route, le="+Inf") == 5
    assert _sample("nixcas_http_sent_bytes_total", route) == 35
    assert _sample("nixcas_http_received_bytes_total", route) == 7


class Child:
    """A metric child with only the public methods (another ``prometheus_client`` layout)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def inc(self, amount: float = 1) -> None:
        self.calls.append(("inc", amount))

    def observe(self, amount: float) -> None:
        self.calls.append(("observe", amount))


def test_values_of_children_without_the_known_layout_use_their_methods() -> None:
    requests, duration, received, sent = Child(), Child(), Child(), Child()
    values = _Values(requests, duration, received, sent)  # type: ignore[arg-type]
    values.add(0.25, 3, 0)
    values.add(0.5, 0, 9)
    assert requests.calls == [("inc", 1), ("inc", 1)]
    assert duration.calls == [("observe", 0.25), ("observe", 0.5)]
    assert received.calls == [("inc", 3)]
    assert sent.calls == [("inc", 9)]


async def test_value_now_reads_at_once_or_says_why_not(tmp_path: Path) -> None:
    service = SqlitePathInfoService(str(tmp_path / "p.sqlite"))
    db = service._db
    query = "SELECT data FROM pathinfo WHERE digest = ?"
    try:
        await db.run(lambda: db.conn.execute("INSERT INTO pathinfo VALUES (?, ?)", (b"\x02" * 20, b"record")))
        assert db.value_now(query, b"\x02" * 20) == b"record"  # opens the reader
        assert db.value_now(query, b"\x03" * 20) is None
        await db.run(lambda: db.conn.execute("UPDATE pathinfo SET data = ? WHERE digest = ?", (b"new", b"\x02" * 20)))
        assert db.value_now(query, b"\x02" * 20) == b"new"  # read anew: never a stale record
        with pytest.raises(StorageError, match="no such table"):
            db.value_now("SELECT data FROM missing WHERE digest = ?", b"\x02" * 20)
        assert db._read_error(sqlite3.OperationalError("database is locked")).__class__ is Busy
    finally:
        await service.close()
    with pytest.raises(StorageError, match="closed"):
        db.value_now(query, b"\x02" * 20)


QUERY = "SELECT data FROM pathinfo WHERE digest = ?"
KEY = b"\x04" * 20


async def test_reads_of_one_loop_iteration_share_one_snapshot_and_the_next_sees_new_commits(tmp_path: Path) -> None:
    service = SqlitePathInfoService(str(tmp_path / "p.sqlite"))
    db = service._db
    other = sqlite3.connect(tmp_path / "p.sqlite", isolation_level=None)  # as another process writes
    try:
        assert db.value_now(QUERY, KEY) is None  # the reader opened
        other.execute("INSERT INTO pathinfo VALUES (?, ?)", (KEY, b"one"))
        assert db.value_now(QUERY, KEY) == b"one"
        assert db._reader is not None and db._reader.in_transaction
        other.execute("UPDATE pathinfo SET data = ? WHERE digest = ?", (b"two", KEY))
        assert db.value_now(QUERY, KEY) == b"one"  # this iteration's requests were all received before
        await asyncio.sleep(0)
        assert not db._reader.in_transaction  # ended as the next iteration began
        assert db.value_now(QUERY, KEY) == b"two"
    finally:
        other.close()
        await service.close()


def test_a_snapshot_of_a_loop_that_no_longer_runs_is_never_read(tmp_path: Path) -> None:
    service = SqlitePathInfoService(str(tmp_path / "p.sqlite"))
    db = service._db
    other = sqlite3.connect(tmp_path / "p.sqlite", isolation_level=None)
    other.execute("INSERT INTO pathinfo VALUES (?, ?)", (KEY, b"one"))

    async def read() -> bytes | None:
        db.value_now(QUERY, KEY)  # the first read opens the reader
        return db.value_now(QUERY, KEY)

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(read()) == b"one"
    finally:
        loop.close()  # its pending callbacks, the snapshot's end among them, are dropped
    other.execute("UPDATE pathinfo SET data = ? WHERE digest = ?", (b"two", KEY))
    assert db.value_now(QUERY, KEY) == b"two"  # no loop running: a read of its own
    other.execute("UPDATE pathinfo SET data = ? WHERE digest = ?", (b"three", KEY))
    assert asyncio.run(read()) == b"three"
    other.close()
    asyncio.run(service.close())
