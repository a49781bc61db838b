"""Traces across processes (issue 18, part 3): a NAR GET on a bridge that reads through a daemon is one trace;
the requests a backend sends to S3 or PostgreSQL are spans of the caller's trace.

The test runs a small OTLP/HTTP receiver (aiohttp, decoding the export requests
with opentelemetry-proto), a real ``nixcas daemon --otlp-endpoint`` subprocess,
and in this process a bridge whose services are ``grpc+http://`` URLs of that
daemon, with tracing set up as ``nar-bridge --otlp-endpoint`` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest_asyncio
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from nixcas.api import Store
from nixcas.bridge.app import NarBridge
from nixcas.bridge.server import start_bridge
from nixcas.composition import blob_service_from_url, pathinfo_service_from_url
from nixcas.ops import tracing
from nixcas.store.importer import Services, import_path
from nixcas.store.narindex import NarIndex
from nixcas.testing import postgres, seaweedfs
from nixcas.testing.daemon import start_daemon
from nixcas.testing.pathinfoservice import make_path_info

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
"""What an instrumented Nix client would send: the bridge's spans must continue this trace."""


@dataclass(frozen=True)
class Received:
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attributes: dict[str, str]


def _text(value: AnyValue) -> str:
    """An attribute value (string, int, bool, …) as text."""
    return str(getattr(value, value.WhichOneof("value") or "string_value"))


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[tuple[str, list[Received]]]:
    """An OTLP/HTTP trace receiver: its base URL and the spans it got."""
    spans: list[Received] = []

    async def export(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest.FromString(await request.read())
        for resource in message.resource_spans:
            service = next(a.value.string_value for a in resource.resource.attributes if a.key == "service.name")
            for scope in resource.scope_spans:
                spans.extend(
                    Received(
                        service,
                        s.trace_id.hex(),
                        s.span_id.hex(),
                        s.parent_span_id.hex(),
                        s.name,
                        s.kind,
                        {a.key: _text(a.value) for a in s.attributes},
                    )
                    for s in scope.spans
                )
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", spans
    await runner.cleanup()


async def test_nar_get_through_a_grpc_store_is_one_trace(tmp_path: Path, receiver: tuple[str, list[Received]]) -> None:
    endpoint, spans = receiver
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "data.bin").write_bytes(bytes(range(256)) * 64)
    async with await Store.open(tmp_path / "store", with_pathinfo=True) as local:
        assert local.pathinfos is not None
        services = Services(local.blobs, local.directories, local.pathinfos, local.nar_calculation())
        info = await import_path(tree, services)
    daemon = await asyncio.to_thread(
        start_daemon, "-l", "127.0.0.1:0", "--otlp-endpoint", endpoint, store=tmp_path / "store", log=tmp_path / "log"
    )
    try:
        tracing.setup(endpoint, "nixcas-nar-bridge")
        url = daemon.client_url()
        index = NarIndex(None)
        try:
            async with await Store.open(
                blob_service_url=url, directory_service_url=url, pathinfo_service_url=url, with_pathinfo=True
            ) as remote:
                assert remote.pathinfos is not None
                bridge = await start_bridge(
                    "127.0.0.1:0", NarBridge(remote.blobs, remote.directories, remote.pathinfos, index)
                )
                try:
                    async with aiohttp.ClientSession() as http:
                        answer = await http.get(f"{bridge.url}/{info.store_path.hash_part}.narinfo")
                        narinfo = await answer.text()
                        assert answer.status == 200, narinfo
                        nar_url = next(line[5:] for line in narinfo.splitlines() if line.startswith("URL: "))
                        answer = await http.get(f"{bridge.url}/{nar_url}", headers={"traceparent": TRACEPARENT})
                        assert answer.status == 200 and len(await answer.read()) == info.nar_size
                finally:
                    await bridge.stop()
        finally:
            await index.close()
            await asyncio.to_thread(tracing.shutdown)  # exports the bridge's spans (to this loop's receiver)
    finally:
        code = await asyncio.to_thread(daemon.stop)  # the daemon exports its spans as it exits
    assert code == 0, daemon.stderr()

    trace_id = TRACEPARENT.split("-")[1]
    trace = [s for s in spans if s.trace_id == trace_id]
    (nar_get,) = [s for s in trace if s.service == "nixcas-nar-bridge" and s.kind == Span.SPAN_KIND_SERVER]
    assert nar_get.name == "GET get_nar" and nar_get.parent_id == TRACEPARENT.split("-")[2]
    calls = {s.span_id: s for s in trace if s.service == "nixcas-nar-bridge" and s.kind == Span.SPAN_KIND_CLIENT}
    assert calls and all(c.parent_id == nar_get.span_id for c in calls.values())
    served = [s for s in trace if s.service == "nixcas-daemon"]
    assert served and all(s.kind == Span.SPAN_KIND_SERVER and s.parent_id in calls for s in served)
    assert {s.name for s in served} >= {"/tvix.castore.v1.DirectoryService/Get", "/tvix.castore.v1.BlobService/Read"}
    # the narinfo GET (no traceparent) is a trace of its own, with the daemon's PathInfo Get in it
    (narinfo_get,) = [s for s in spans if s.name == "GET get_narinfo"]
    assert narinfo_get.trace_id != trace_id and narinfo_get.parent_id == ""
    assert any(
        s.service == "nixcas-daemon" and s.trace_id == narinfo_get.trace_id and s.name.endswith("PathInfoService/Get")
        for s in spans
    )


async def test_s3_and_postgres_requests_are_spans_of_the_callers_trace(
    receiver: tuple[str, list[Received]], s3_url: str, pg_url: str
) -> None:
    endpoint, spans = receiver
    info = make_path_info("traced")
    tracing.setup(endpoint, "nixcas-traced")
    try:
        blobs = await blob_service_from_url(s3_url)
        infos = await pathinfo_service_from_url(pg_url)
        try:
            with tracing.server_span("caller", {"traceparent": TRACEPARENT}, {}):
                digest = await blobs.put(b"traced blob " * 100)
                assert await blobs.read(digest) == b"traced blob " * 100
                await infos.put(info)
                assert await infos.get(info.store_path.digest) == info
            assert await infos.get(b"\0" * 20) is None  # outside the caller's span: a trace of its own
        finally:
            await infos.close()
            await blobs.close()
    finally:
        await asyncio.to_thread(tracing.shutdown)

    trace_id, parent_id = TRACEPARENT.split("-")[1:3]
    (caller,) = [s for s in spans if s.name == "caller"]
    assert caller.trace_id == trace_id and caller.parent_id == parent_id
    backend = [s for s in spans if s.trace_id == trace_id and s.span_id != caller.span_id]
    assert all(s.parent_id == caller.span_id and s.kind == Span.SPAN_KIND_CLIENT for s in backend)
    names = {s.name for s in backend}
    assert {"objectstore PUT", "objectstore GET", "postgresql pathinfo.put", "postgresql pathinfo.get"} <= names
    assert all(n.startswith(("objectstore ", "postgresql pathinfo.")) for n in names), names
    store = s3_url.removeprefix("objectstore+").partition("?")[0]
    put = next(s for s in backend if s.name == "objectstore PUT")
    assert put.attributes["nixcas.objectstore.method"] == "PUT"
    assert put.attributes["nixcas.objectstore.store"] == store
    assert "/b3/" in put.attributes["nixcas.objectstore.key"]
    get = next(s for s in backend if s.name == "postgresql pathinfo.get")
    assert get.attributes["db.system"] == "postgresql" and get.attributes["db.operation.name"] == "pathinfo.get"
    assert get.attributes["server.address"] == "127.0.0.1"
    (lone,) = [s for s in spans if s.name == "postgresql pathinfo.get" and s.trace_id != trace_id]
    assert lone.parent_id == ""
    for secret in (seaweedfs.ACCESS_KEY, seaweedfs.SECRET_KEY, postgres.PASSWORD):
        assert secret in s3_url + pg_url  # the URLs did carry them
        assert not any(secret in f"{s.name} {s.attributes}" for s in spans)
