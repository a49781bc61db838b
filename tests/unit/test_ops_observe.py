"""Operating nixcas (issue 18, parts 1-3): log setup, access lines, metrics, no secret in logs or error bodies.

In-process: a bridge and a gRPC daemon over memory services, the process's
logging set up as a command does it (``nixcas.ops.logs.configure``) but
writing into a buffer.  Tracing across processes is in ``test_ops_tracing.py``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import grpc
import grpc.aio
import pytest
import pytest_asyncio
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2 as blob_pb
from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2_grpc as blob_grpc
from nixcas.bridge.app import NarBridge
from nixcas.bridge.server import RunningBridge, start_bridge
from nixcas.castore.blob.base import BlobReader
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.errors import StorageError
from nixcas.ops import logs, metrics
from nixcas.ops.logs import LogOptions
from nixcas.registry import parse_service_url
from nixcas.server import RunningServer, start_server
from nixcas.store.importer import Services, import_path
from nixcas.store.nar.hashing import SimpleNarCalculationService
from nixcas.store.narindex import NarIndex
from nixcas.store.pathinfo.memory import MemoryPathInfoService

SECRET = "Sup3rSecretKeyValue42"  # noqa: S105 - the credential the test looks for
SECRET_URL = f"objectstore+s3://bucket/prefix?endpoint=http://127.0.0.1:1&access_key_id=AKID&secret_access_key={SECRET}"
LINE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (DEBUG|INFO|WARNING|ERROR) ([\w.]+): (.*)")


class LeakyBlobs(MemoryBlobService):
    """Blobs whose reads fail with a message that repeats a credential, as a careless storage library might."""

    async def _open_read(self, digest: B3Digest) -> BlobReader | None:
        raise StorageError(f"GET https://s3.example/{digest.hex()[:8]}?X-Secret={SECRET} failed: 403")

    async def sizes(self, digests: Sequence[B3Digest]) -> list[int | None]:
        raise StorageError(f"HEAD https://s3.example/?X-Secret={SECRET} failed: 403")


@dataclass
class Served:
    bridge: RunningBridge
    daemon: RunningServer
    store_path: str
    nar_url: str
    blob: B3Digest


@pytest.fixture
def log_buffer() -> Iterator[io.StringIO]:
    """The root logger set up as a server's (INFO, text), writing into the yielded buffer; restored afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    knobs = logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing
    buffer = io.StringIO()
    for handler in handlers:  # pytest's: with them, access lines would never take their direct way
        root.removeHandler(handler)
    logs.configure(LogOptions(), server=True, stream=buffer)
    yield buffer
    logs.configure(LogOptions())  # the module's remembered options back to the defaults
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing = knobs


async def _serve(tmp_path: Path, blobs: MemoryBlobService) -> AsyncIterator[Served]:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_bytes(b"hello, operator\n" * 100)
    directories, pathinfos = MemoryDirectoryService(), MemoryPathInfoService()
    services = Services(
        MemoryBlobService(), directories, pathinfos, SimpleNarCalculationService(blobs, directories)
    )  # ingest into a plain service, then copy the blob into ``blobs`` (which may fail its reads)
    info = await import_path(tree, services)
    for digest in list(services.blobs._blobs):  # type: ignore[attr-defined]
        data = await services.blobs.read(digest)
        assert data is not None
        await MemoryBlobService.put(blobs, data)
    blob = next(iter(services.blobs._blobs))  # type: ignore[attr-defined]
    index = NarIndex(None)
    bridge = await start_bridge("127.0.0.1:0", NarBridge(blobs, directories, pathinfos, index))
    daemon = await start_server("127.0.0.1:0", blobs, directories, pathinfos=pathinfos)
    try:
        async with aiohttp.ClientSession() as http:
            narinfo = await (await http.get(f"{bridge.url}/{info.store_path.hash_part}.narinfo")).text()
        nar_url = next(line.split(": ", 1)[1] for line in narinfo.splitlines() if line.startswith("URL: "))
        yield Served(bridge, daemon, str(info.store_path), nar_url, B3Digest(blob))
    finally:
        await daemon.stop(0)
        await bridge.stop()
        await index.close()


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async for s in _serve(tmp_path, MemoryBlobService()):
        yield s


@pytest_asyncio.fixture
async def leaky(tmp_path: Path) -> AsyncIterator[Served]:
    parse_service_url("blobservices", SECRET_URL)  # configured: its credentials are now known to the process
    async for s in _serve(tmp_path, LeakyBlobs()):
        yield s


async def access_lines(buffer: io.StringIO, n: int) -> None:
    """Wait (a little, at most) until ``n`` access lines are written: each is written once its answer is sent,
    which may be just after the client has it."""
    for _ in range(200):
        if buffer.getvalue().count("nixcas.access") >= n:
            return
        await asyncio.sleep(0.005)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_real_requests(served: Served) -> None:
    """GET /metrics after real HTTP requests and gRPC calls: each one counted under its route/method and status."""
    base = served.bridge.url
    async with aiohttp.ClientSession() as http:
        before = _samples(await (await http.get(f"{base}/metrics")).text())
        for _ in range(3):
            assert (await http.get(f"{base}/nix-cache-info")).status == 200
        nar = await http.get(f"{base}/{served.nar_url}", headers={"Accept-Encoding": "identity"})
        nar_size = len(await nar.read())
        assert nar.status == 200 and nar_size > 1600
        assert (await http.get(f"{base}/{'0' * 32}.narinfo")).status == 404
        assert (await http.put(f"{base}/nar/{'1' * 52}.nar", data=b"x" * 100)).status == 403
        async with grpc.aio.insecure_channel(served.daemon.url.removeprefix("grpc+http://")) as channel:
            stub = blob_grpc.BlobServiceStub(channel)
            await stub.Stat(blob_pb.StatBlobRequest(digest=bytes(served.blob)))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Stat(blob_pb.StatBlobRequest(digest=b"\1" * 32))
        calls_key = ("nixcas_grpc_call_duration_seconds_count", (("method", "/tvix.castore.v1.BlobService/Stat"),))
        for _ in range(
            100
        ):  # a call is recorded as its handler ends, which may be just after the client has its answer
            response = await http.get(f"{base}/metrics")
            assert response.status == 200 and response.content_type == "text/plain"
            after = _samples(await response.text())
            if after.get(calls_key, 0) - before.get(calls_key, 0) >= 2:
                break
            await asyncio.sleep(0.01)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("nixcas_http_requests_total", route="cache_info", method="GET", status="200") == 3
    assert delta("nixcas_http_requests_total", route="get_nar", method="GET", status="200") == 1
    assert delta("nixcas_http_requests_total", route="get_narinfo", method="GET", status="404") == 1
    assert delta("nixcas_http_requests_total", route="put_nar", method="PUT", status="403") == 1
    assert nar_size < delta("nixcas_http_sent_bytes_total", route="get_nar") < nar_size + 1000  # + status, headers
    assert delta("nixcas_http_request_duration_seconds_count", route="cache_info") == 3
    assert delta("nixcas_bridge_uploads_total", kind="nar", result="refused") == 1
    stat = "/tvix.castore.v1.BlobService/Stat"
    assert delta("nixcas_grpc_calls_total", method=stat, code="OK") == 1
    assert delta("nixcas_grpc_calls_total", method=stat, code="NOT_FOUND") == 1
    assert delta("nixcas_grpc_call_duration_seconds_count", method=stat) == 2
    assert delta("nixcas_grpc_received_bytes_total", method=stat) == 2 * 34  # field tag, length, 32 bytes
    assert after[("nixcas_http_requests_in_flight", ())] == 1  # the /metrics request itself
    assert after[("nixcas_grpc_calls_in_flight", ())] == 0
    assert ("nixcas_gc_runs_total", ()) in after
    assert any(name == "process_resident_memory_bytes" for name, _ in after)


def test_metrics_port_serves_the_same_metrics() -> None:
    """``--metrics-listen-address``: a port of its own, for servers without HTTP (daemon, mount)."""
    import urllib.request

    with (
        metrics.start_metrics_server("127.0.0.1:0") as server,
        urllib.request.urlopen(server.url, timeout=10) as answer,  # noqa: S310 - our own http URL
    ):
        text = answer.read().decode()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"nixcas_http_requests", "nixcas_grpc_calls", "nixcas_cache_lookups", "process_cpu_seconds"} <= names


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "through-logging"])
async def test_access_lines_have_time_level_and_fields(
    served: Served, log_buffer: io.StringIO, direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One line per request and per call: timestamp (UTC, now), level, logger, method, target, status, bytes, time.

    The same whether written directly (our handler alone on the root logger) or through :mod:`logging`.
    """
    access = logging.getLogger("nixcas.access")
    handled: list[logging.LogRecord] = []

    def handle(record: logging.LogRecord) -> None:
        handled.append(record)
        logging.Logger.handle(access, record)

    monkeypatch.setattr(access, "handle", handle)
    root = logging.getLogger()
    others = [h for h in root.handlers if not isinstance(h, logs._Handler)]  # pytest's, added for this phase
    for handler in others:
        root.removeHandler(handler)
    if not direct:
        root.addHandler(logging.NullHandler())
    try:
        await _access_lines_have_time_level_and_fields(served, log_buffer)
    finally:
        for handler in others:
            root.addHandler(handler)
    assert len(handled) == (0 if direct else 3)


async def _access_lines_have_time_level_and_fields(served: Served, log_buffer: io.StringIO) -> None:
    started = datetime.now(UTC)
    async with aiohttp.ClientSession() as http:
        assert (await http.get(f"{served.bridge.url}/nix-cache-info")).status == 200
        assert (await http.get(f"{served.bridge.url}/{'0' * 32}.narinfo")).status == 404
        async with grpc.aio.insecure_channel(served.daemon.url.removeprefix("grpc+http://")) as channel:
            await blob_grpc.BlobServiceStub(channel).Stat(blob_pb.StatBlobRequest(digest=bytes(served.blob)))
        assert (await http.get(f"{served.bridge.url}/metrics")).status == 200  # a scrape: DEBUG, not shown
    await access_lines(log_buffer, 3)
    lines = [m for m in map(LINE.fullmatch, log_buffer.getvalue().splitlines()) if m and m[3] == "nixcas.access"]
    assert len(lines) == 3, log_buffer.getvalue()
    for match in lines:
        when = datetime.strptime(match[1], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert abs((when - started).total_seconds()) < 30
        assert match[2] == "INFO"
    assert re.fullmatch(r'127\.0\.0\.1 "GET /nix-cache-info" 200 \d+B [\d.]+ms user=-', lines[0][4])
    assert re.fullmatch(rf'127\.0\.0\.1 "GET /{"0" * 32}\.narinfo" 404 \d+B [\d.]+ms user=-', lines[1][4])
    assert re.fullmatch(
        r"/tvix\.castore\.v1\.BlobService/Stat OK [\d.]+ms in=34B out=\d+B peer=ipv4:127\.0\.0\.1:\d+", lines[2][4]
    )


async def test_json_access_lines(served: Served, log_buffer: io.StringIO) -> None:
    """``--log-format json``: one object a line, the access fields as keys."""
    logs.configure(LogOptions(format="json"), server=True, stream=log_buffer)
    async with aiohttp.ClientSession() as http:
        assert (await http.get(f"{served.bridge.url}/{served.nar_url}", headers={"Range": "bytes=0-9"})).status == 206
    await access_lines(log_buffer, 1)
    entries = [json.loads(line) for line in log_buffer.getvalue().splitlines()]
    access = [e for e in entries if e["logger"] == "nixcas.access"]
    assert len(access) == 1, entries
    entry = access[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]) and entry["level"] == "INFO"
    assert (entry["method"], entry["route"], entry["status"]) == ("GET", "get_nar", 206)
    assert 10 < entry["sent_bytes"] < 1000 and entry["received_bytes"] == 0
    assert entry["target"] == "/" + served.nar_url and entry["client"] == "127.0.0.1" and entry["user"] == "-"


async def test_a_client_cannot_forge_or_flood_log_lines(served: Served, log_buffer: io.StringIO) -> None:
    """A request whose path holds (percent-encoded) newlines and 5,000 characters writes short single lines."""
    forged = "%0A2026-01-01T00:00:00.000Z ERROR nixcas.access: forged" + "A" * 5000
    async with aiohttp.ClientSession() as http:
        for path in (f"/{forged}.ls", f"/nar/{forged}", "/nar/x%0Ay.nar?token=abc&narsize=1"):
            answer = await http.get(f"{served.bridge.url}{path}")
            assert 400 <= answer.status < 500
    await access_lines(log_buffer, 3)
    text = log_buffer.getvalue()
    lines = text.splitlines()
    matches = [LINE.fullmatch(line) for line in lines]
    assert lines and all(matches), text[:2000]
    assert not any(m[1].startswith("2026-01-01") or m[2] == "ERROR" for m in matches if m)
    assert max(map(len, lines)) <= logs.MAX_MESSAGE + 200
    assert "token=***" in text and "token=abc" not in text


async def test_no_secret_in_any_log_line_or_error_body(leaky: Served, log_buffer: io.StringIO) -> None:
    """A store failing with a message that carries a configured credential: the HTTP body, the gRPC status
    details and every log line show ``***`` instead (``nixcas.urls.redacted``)."""
    async with aiohttp.ClientSession() as http:
        answer = await http.get(f"{leaky.bridge.url}/{leaky.nar_url}")
        body = await answer.text()
    assert answer.status == 500 and "X-Secret=***" in body and SECRET not in body
    async with grpc.aio.insecure_channel(leaky.daemon.url.removeprefix("grpc+http://")) as channel:
        reading = blob_grpc.BlobServiceStub(channel).Read(blob_pb.ReadBlobRequest(digest=bytes(leaky.blob)))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in reading:
                pass
    details = failed.value.details() or ""
    assert "X-Secret=***" in details and SECRET not in details
    logging.getLogger("nixcas.test").error("opening %s failed", SECRET_URL)  # a library logging the raw URL
    text = log_buffer.getvalue()
    assert text.count("X-Secret=***") >= 2 and "secret_access_key=***" in text, text
    assert SECRET not in text


def test_log_level_options(log_buffer: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--log-level``, ``NIXCAS_LOG_LEVEL``, ``-v``/``-q`` (from the command's default) and ``--log-format``."""
    from nixcas.cli.app import cli

    root = logging.getLogger()
    runner = CliRunner()
    cases = [
        ([], {}, logging.WARNING),
        (["-v"], {}, logging.INFO),
        (["-vv"], {}, logging.DEBUG),
        (["-q"], {}, logging.ERROR),
        (["--log-level", "debug"], {}, logging.DEBUG),
        (["-vv", "--log-level", "ERROR"], {}, logging.ERROR),
        ([], {"NIXCAS_LOG_LEVEL": "info"}, logging.INFO),
    ]
    for args, env, level in cases:
        result = runner.invoke(cli, [*args, "generate-key", "test-1"], env=env)
        assert result.exit_code == 0, result.output
        assert root.level == level, (args, env)
    assert LogOptions(verbosity=1).level_for(logging.INFO) == logging.DEBUG  # a server's default moved by -v
    assert LogOptions(verbosity=-1).level_for(logging.INFO) == logging.WARNING
    bad = runner.invoke(cli, ["--log-level", "loud", "generate-key", "x"])
    assert bad.exit_code == 2 and "loud" in bad.output
    runner.invoke(cli, ["--log-format", "json", "generate-key", "test-1"])
    handler = next(h for h in root.handlers if isinstance(h, logging.StreamHandler) and type(h).__name__ == "_Handler")
    assert isinstance(handler.formatter, logs.JsonFormatter)
    assert len([h for h in root.handlers if type(h).__name__ == "_Handler"]) == 1


def test_log_messages_are_bounded_single_lines() -> None:
    assert logs.bounded("a\nb\r\x1b[31m") == "a\\nb\\r\\x1b[31m"
    long = logs.bounded("x" * 5000)
    assert long.startswith("x" * logs.MAX_MESSAGE) and long.endswith("(4000 more characters)")


def test_a_secret_cut_by_the_bound_is_still_redacted() -> None:
    """Credentials are replaced before a long message is cut: no prefix of one survives the cut."""
    from nixcas.urls import remember_secrets

    secret = "Cut0ffSecretPassw0rd"  # noqa: S105 - a test credential
    remember_secrets(f"postgresql://u:{secret}@db.example/x")
    message = "x" * (logs.MAX_MESSAGE - 8) + secret
    record = logging.LogRecord("nixcas.test", logging.WARNING, __file__, 1, message, None, None)
    for formatter in (logs.TextFormatter(), logs.JsonFormatter()):
        line = formatter.format(record)
        assert secret[:6] not in line, line[-80:]


def test_otlp_endpoint_without_the_extra_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--otlp-endpoint`` without OpenTelemetry installed: exit 2, one line naming the extra."""
    from nixcas.cli.observe import telemetry

    monkeypatch.setitem(__import__("sys").modules, "opentelemetry.sdk.trace", None)
    root = logging.getLogger()
    level = root.level
    try:
        with pytest.raises(SystemExit) as exited, telemetry("nixcas-test", None, "http://127.0.0.1:4318"):
            pytest.fail("telemetry started without OpenTelemetry")
    finally:
        root.setLevel(level)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err == "nixcas: error: --otlp-endpoint needs OpenTelemetry: pip install 'nixcas[otel]'\n"


def test_metrics_listen_address_errors() -> None:
    from nixcas.errors import ConfigurationError

    for wrong in ("9100", "::1:0", "[::1:0", "./metrics.sock", "127.0.0.1:65536"):  # parsed as every server's address
        with pytest.raises(ConfigurationError, match="expected host:port"):
            metrics.start_metrics_server(wrong)
    with metrics.start_metrics_server("127.0.0.1:0") as taken:
        port = taken.url.rsplit(":", 1)[1].split("/")[0]
        with pytest.raises(ConfigurationError, match=f"cannot listen on 127.0.0.1:{port} for metrics"):
            metrics.start_metrics_server(f"127.0.0.1:{port}")


async def test_store_counters(tmp_path: Path) -> None:
    """Cache hits and misses, upstream fetches, blobs and chunks written: counted as the store works, exported."""
    from nixcas.castore.blob.combined import CombinedBlobService
    from nixcas.castore.blob.local import LocalBlobService
    from nixcas.ops import stats

    before = stats.snapshot()

    def delta(name: str, *labels: str) -> float:
        return stats.snapshot().get((name, labels), 0) - before.get((name, labels), 0)

    far = MemoryBlobService()
    digest = await far.put(b"far away" * 100)
    async with LocalBlobService(tmp_path / "near", avg_chunk_size=1024) as near:
        combined = CombinedBlobService(near, far)
        assert await combined.read(digest) == b"far away" * 100  # miss: fetched, copied near
        assert await combined.read(digest) == b"far away" * 100  # hit
        assert await combined.read(B3Digest(b"\1" * 32)) is None  # miss, far has nothing either
        assert delta("nixcas_cache_lookups", "blob", "hit") == 1
        assert delta("nixcas_cache_lookups", "blob", "miss") == 2
        assert delta("nixcas_upstream_fetches", "blob", "ok") == 3  # near keeps chunks: far.chunks, then the read
        big = bytes(range(256)) * 64  # 16 KiB: cut into several 1 KiB-average chunks
        await near.put(big)
        assert delta("nixcas_blobs_written", "local") >= 2  # the near copy of the far blob, and this one
        assert delta("nixcas_blob_bytes_written", "local") >= len(big) + 800
        assert delta("nixcas_chunks_written", "local") >= 2
    text = metrics.exposition().decode()
    assert 'nixcas_cache_lookups_total{result="hit",service="blob"}' in text
    assert re.search(r'^nixcas_chunks_written_total\{backend="local"\} [1-9]', text, re.M)


def test_every_metric_is_documented() -> None:
    """The metrics table of docs/operations.md names every metric nixcas defines (and no other ``nixcas_`` one)."""
    from nixcas.ops import stats

    root = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
    page = (root / "docs" / "operations.md").read_text()
    section = page[page.index("## Metrics") : page.index("## Tracing")]
    documented = set(re.findall(r"`(nixcas_\w+)`", section))
    defined = {f"{name}_total" for name in stats.COUNTERS}
    defined |= {f"{name}_total" if kind == "counter" else name for name, (kind, _, _) in metrics.GC_METRICS.items()}
    for value in vars(metrics).values():
        if isinstance(value, metrics.Counter):
            defined.add(f"{value._name}_total")
        elif isinstance(value, metrics.Histogram | metrics.Gauge):
            defined.add(value._name)
    assert documented == defined


def test_gc_runs_reach_the_servers_metrics(tmp_path: Path, log_buffer: io.StringIO) -> None:
    """``nixcas gc`` records each run in the store; a server's metrics on that store show runs and bytes freed."""
    from nixcas.api import Store
    from nixcas.cli.app import cli

    store_dir = tmp_path / "store"

    async def garbage() -> None:
        async with await Store.open(store_dir) as store:
            await store.blobs.put(b"nobody refers to this" * 1000)

    asyncio.run(garbage())
    metrics.watch_store(store_dir)
    runner = CliRunner()
    for _ in range(2):
        result = runner.invoke(cli, ["--store-dir", str(store_dir), "gc", "--grace", "0s", "--json"])
        assert result.exit_code == 0, result.output
    freed = json.loads(result.output.splitlines()[-1])["freed_bytes"]
    first = json.loads(runner.invoke(cli, ["--store-dir", str(store_dir), "gc", "--dry-run", "--json"]).output)
    assert first["dry_run"] and freed == 0  # the second run found nothing left
    samples = _samples(metrics.exposition().decode())
    assert samples[("nixcas_gc_runs_total", ())] >= 2  # dry runs are not counted
    assert samples[("nixcas_gc_freed_bytes_total", ())] >= 21_000
    assert samples[("nixcas_gc_last_freed_bytes", ())] == 0
    assert abs(samples[("nixcas_gc_last_run_timestamp_seconds", ())] - time.time()) < 60
