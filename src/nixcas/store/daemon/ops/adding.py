"""Handlers that add paths, signatures, and send a path's NAR."""

from __future__ import annotations

from nixcas.errors import PathInfoError
from nixcas.store.daemon.ops.args import parse_path, read_path
from nixcas.store.daemon.ops.incoming import IncomingInfo, Pipeline, check_incoming, drain, ingest
from nixcas.store.daemon.ops.state import MAX_SIG
from nixcas.store.daemon.session import DaemonError, Session, SessionEnd
from nixcas.store.daemon.wire import FramedSource, LimitedSource, ProtocolError, TunnelSource, WireReader
from nixcas.store.pathinfo.model import Signature


async def add_to_store_nar(s: Session) -> None:
    raw = await IncomingInfo.read(s.wire)
    await s.wire.u64()  # repair: nothing nixcas stores can be repaired in place
    dont_check_sigs = await s.wire.flag()
    check_sigs = not (dont_check_sigs and s.trusted)
    source: FramedSource | LimitedSource
    if s.minor >= 23:
        source = FramedSource(s.wire)
    elif s.minor >= 21:
        source = LimitedSource(TunnelSource(s.wire, s.writer), raw.nar_size)
    else:
        source = LimitedSource(s.wire, raw.nar_size)
    try:
        info = await check_incoming(s, raw, check_sigs=check_sigs)
        await ingest(s, info, source)
    except Exception as e:
        await drain(source)  # a broken connection raises here: the session ends
        if isinstance(e, ProtocolError):  # the NAR framing was fine, what it carried was not
            raise DaemonError(str(e)) from None
        raise
    await drain(source)
    s.last()


async def add_multiple_to_store(s: Session) -> None:
    await s.wire.u64()  # repair
    dont_check_sigs = await s.wire.flag()
    check_sigs = not (dont_check_sigs and s.trusted)
    framed = FramedSource(s.wire)
    inner = WireReader(framed)
    pipeline = Pipeline(s)
    try:
        count = await inner.u64()
        for _ in range(count):
            raw = await IncomingInfo.read(inner)
            info = await check_incoming(s, raw, check_sigs=check_sigs, pending=pipeline.digests)
            nar = LimitedSource(framed, raw.nar_size)
            await pipeline.add(info, nar)
            await drain(nar)  # nothing left, unless the path was valid already
        await pipeline.finish()
    except Exception as e:
        await pipeline.settle()
        await framed.drain()  # a broken connection raises here: the session ends
        if isinstance(e, ProtocolError):
            raise DaemonError(str(e)) from None
        raise
    except BaseException:
        await pipeline.abort()
        raise
    await framed.drain()
    s.last()


async def add_signatures(s: Session) -> None:
    path = parse_path(await read_path(s))
    texts = await s.wire.texts(MAX_SIG, "signature")
    try:
        sigs = [Signature.parse(t) for t in texts]
    except PathInfoError as e:
        raise DaemonError(str(e)) from None
    info = await s.state.require(path)
    if not s.trusted:
        from nixcas.store.signing import path_info_fingerprint

        message = path_info_fingerprint(info)
        for sig in sigs:
            if not any(key.verify(message, sig) for key in s.state.trusted_keys):
                raise DaemonError(
                    f"cannot add signature '{sig.name}' to '{path}': it is not a valid signature by a trusted key"
                )
    await s.state.pathinfos.put(info.with_signatures(sigs))
    s.last().u64(1)


async def nar_from_path(s: Session) -> None:
    from nixcas.store.nar.source import NarSource

    path = parse_path(await read_path(s))
    info = await s.state.require(path)
    chunks = NarSource(info.node, s.state.blobs, s.state.directories).stream()
    try:
        first = await anext(chunks, None)  # a missing blob or directory still gets an error frame
        s.last()
        await s.flush()
        sent = 0
        while first is not None:
            s.writer.write(first)
            sent += len(first)
            await s.writer.drain()
            first = await anext(chunks, None)
    finally:
        await chunks.aclose()
    if sent != info.nar_size:
        raise SessionEnd(f"{path}: rendered {sent} bytes of NAR, its path info says {info.nar_size}")
