"""Paths added by a client: checking their path info, ingesting their NAR, registering them."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from nixcas.castore.nodes import FileNode, Node
from nixcas.errors import NixbaseError, PathInfoError, ValidationError
from nixcas.store.daemon.ops.args import parse_deriver, parse_path
from nixcas.store.daemon.ops.state import MAX_PATH, MAX_SIG, log
from nixcas.store.daemon.session import DaemonError, Session
from nixcas.store.daemon.wire import FramedSource, LimitedSource, TunnelSource, WireReader
from nixcas.store.hashes import CAHash, CAKind, HashAlgo, NixHash
from nixcas.store.pathinfo.model import PathInfo, Signature
from nixcas.store.store_path import StorePath


@dataclass
class IncomingInfo:
    """A ``ValidPathInfo`` as the client sent it (strings, parsed once the NAR framing is known)."""

    path: str
    deriver: str
    nar_hash: str
    references: list[str]
    nar_size: int
    signatures: list[str]
    ca: str

    @classmethod
    async def read(cls, wire: WireReader) -> IncomingInfo:
        path = await wire.text(MAX_PATH, "store path")
        deriver = await wire.text(MAX_PATH, "deriver")
        nar_hash = await wire.text(200, "NAR hash")
        references = await wire.texts(MAX_PATH, "reference")
        await wire.u64()  # registration time
        nar_size = await wire.u64()
        await wire.u64()  # ultimate (never trusted from a client)
        signatures = await wire.texts(MAX_SIG, "signature")
        ca = await wire.text(300, "content address")
        return cls(path, deriver, nar_hash, references, nar_size, signatures, ca)


@dataclass
class CheckedInfo:
    store_path: StorePath
    deriver: StorePath | None
    nar_sha256: bytes
    references: tuple[StorePath, ...]
    nar_size: int
    signatures: tuple[Signature, ...]
    ca: CAHash | None
    verify_content: bool = False
    """Accepted for its flat or text content address alone: the file's hash is checked once it is stored."""


async def check_incoming(
    s: Session, raw: IncomingInfo, *, check_sigs: bool, pending: frozenset[bytes] | set[bytes] = frozenset()
) -> CheckedInfo:
    """Parse and vet a path info before its NAR is read: well-formed, references present, trusted enough."""
    store_path = parse_path(raw.path)
    try:
        nar_hash = NixHash.parse(raw.nar_hash, HashAlgo.SHA256)
        if nar_hash.algo is not HashAlgo.SHA256:
            raise DaemonError(f"{store_path}: the NAR hash must be sha256")
        signatures = tuple(Signature.parse(text) for text in raw.signatures)
        ca = CAHash.parse(raw.ca) if raw.ca else None
    except (NixbaseError, PathInfoError) as e:
        raise DaemonError(f"{store_path}: {e}") from None
    checked = CheckedInfo(
        store_path,
        parse_deriver(raw.deriver),
        nar_hash.digest,
        tuple(parse_path(r) for r in raw.references),
        raw.nar_size,
        signatures,
        ca,
    )
    from nixcas.store.importer import check_content_address

    try:
        check_content_address(_ContentView(checked))
    except ValidationError as e:
        raise DaemonError(str(e)) from None
    missing = []
    for ref in checked.references:
        if ref.digest != store_path.digest and ref.digest not in pending and await s.state.get(ref) is None:
            missing.append(str(ref))
    if missing:
        raise DaemonError(
            f"cannot add path '{store_path}': its references are not valid here (add them first): "
            + ", ".join(missing[:5])
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    needs_sig = not s.trusted or (check_sigs and s.state.require_sigs)
    if needs_sig and not _self_certifying(checked) and not _signed(s, checked):
        if checked.ca is None or checked.ca.kind is CAKind.NAR:
            raise DaemonError(f"cannot add path '{store_path}' because it lacks a signature by a trusted key")
        checked.verify_content = True  # flat or text: certified by its file's hash, checked after ingest
    return checked


async def verify_content(s: Session, info: CheckedInfo, node: Node) -> None:
    """A flat or text content address must be the hash of the path's one regular, non-executable file."""
    import hashlib

    assert info.ca is not None
    if not isinstance(node, FileNode) or node.executable:
        raise DaemonError(f"{info.store_path}: a {info.ca.kind.value} content address needs a single regular file")
    h = hashlib.new(info.ca.hash.algo.value)
    reader = await s.state.blobs.open_read(node.digest)
    if reader is None:
        raise DaemonError(f"{info.store_path}: its file's blob {node.digest.hex()} vanished")
    async with reader:
        while chunk := await reader.read(1 << 20):
            h.update(chunk)
    if h.digest() != info.ca.hash.digest:
        raise DaemonError(f"{info.store_path}: its content does not have the hash of its content address {info.ca}")


@dataclass
class _ContentView:
    """What :func:`~nixcas.store.importer.check_content_address` reads."""

    info: CheckedInfo

    @property
    def store_path(self) -> StorePath:
        return self.info.store_path

    @property
    def references(self) -> tuple[StorePath, ...]:
        return self.info.references

    @property
    def ca(self) -> CAHash | None:
        return self.info.ca

    @property
    def nar_hash(self) -> NixHash:
        return NixHash(HashAlgo.SHA256, self.info.nar_sha256)


def _self_certifying(info: CheckedInfo) -> bool:
    """A ``fixed:r:sha256`` path: its store path follows from the NAR hash that ingest verifies."""
    ca = info.ca
    return ca is not None and ca.kind is CAKind.NAR and ca.hash.algo is HashAlgo.SHA256


def _signed(s: Session, info: CheckedInfo) -> bool:
    from nixcas.store.narinfo import fingerprint
    from nixcas.store.signing import has_valid_signature

    message = fingerprint(info.store_path, info.nar_sha256, info.nar_size, info.references)
    return has_valid_signature(message, info.signatures, s.state.trusted_keys)


async def ingest(s: Session, info: CheckedInfo, source: FramedSource | TunnelSource | LimitedSource) -> PathInfo:
    """Import the NAR, check it against ``info``, and register the path (a valid path is kept as it is)."""
    from nixcas.store.nar.ingest import ingest_nar

    existing = await s.state.get(info.store_path)
    if existing is not None:  # as Nix does: a valid path is not replaced (its NAR is skipped by the caller)
        log.debug("%s: %s is valid already", s.peer, info.store_path)
        return existing
    node, _, _ = await ingest_nar(
        source,
        s.state.blobs,
        s.state.directories,
        expected_size=info.nar_size,
        expected_sha256=info.nar_sha256,
        sync=s.state.blob_sync.sync,
    )
    if info.verify_content:
        await verify_content(s, info, node)
    return await register(s, info, node)


async def register(s: Session, info: CheckedInfo, node: Node) -> PathInfo:
    """Write the PathInfo of an ingested NAR (its size and hash were checked); take a pending temp root."""
    path_info = PathInfo(
        store_path=info.store_path,
        node=node,
        references=info.references,
        nar_size=info.nar_size,
        nar_sha256=info.nar_sha256,
        signatures=info.signatures,
        deriver=info.deriver,
        ca=info.ca,
    )
    stored = await s.state.pathinfos.put(path_info)
    if stored.digest in s.temp_roots and not s.temp_roots[stored.digest]:
        name = s.state.root_prefix + f"{s.id}-{stored.store_path.hash_part}"
        if await s.state.pin(name, stored.node):
            s.temp_roots[stored.digest] = name
    log.debug("%s: added %s (%d bytes of NAR)", s.peer, stored.store_path, stored.nar_size)
    return stored


class Pipeline:
    """Paths of one ``AddMultipleToStore``, read one after the other, made durable together.

    Each NAR is parsed and checked as it arrives; its wait for durability (one
    shared barrier, see :class:`~nixcas.bridge.groupsync.GroupSync`), its
    directory commit and its PathInfo write go on in the background while the
    next NAR is read.  PathInfos are written strictly in arrival order
    (references first, as Nix sends them), each only after its own data is
    durable and the one before it was written, so a crash never leaves a valid
    path whose data or references are missing; after a failure none of the
    later paths is written.
    """

    MAX_PENDING = 64

    def __init__(self, s: Session) -> None:
        self.s = s
        self.ingests: list[asyncio.Task[tuple[Node, int, bytes]]] = []
        self.writes: deque[asyncio.Task[None]] = deque()
        self.digests: set[bytes] = set()
        """Paths read but not yet registered: valid references for the paths after them."""

    async def add(self, info: CheckedInfo, nar: LimitedSource) -> None:
        """Read ``nar`` (returns once it is read and checked; its registration may still be pending)."""
        from nixcas.store.nar.ingest import ingest_nar

        self._raise_failed()
        if info.store_path.digest in self.digests or await self.s.state.get(info.store_path) is not None:
            return  # valid already (or earlier in this stream): the caller skips the NAR
        read = asyncio.Event()

        async def barrier() -> None:  # ingest_nar calls it once the NAR was read in full and matched
            read.set()
            await self.s.state.blob_sync.sync()

        task = asyncio.ensure_future(
            ingest_nar(
                nar,
                self.s.state.blobs,
                self.s.state.directories,
                expected_size=info.nar_size,
                expected_sha256=info.nar_sha256,
                sync=barrier,
            )
        )
        waiter = asyncio.ensure_future(read.wait())
        try:
            await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        finally:
            waiter.cancel()
        if task.done() and task.exception() is not None:
            await task  # raises
        self.ingests = [t for t in self.ingests if not t.done()]
        self.ingests.append(task)
        self.digests.add(info.store_path.digest)
        previous = self.writes[-1] if self.writes else None
        self.writes.append(asyncio.ensure_future(self._write(info, task, previous)))
        while self.writes and self.writes[0].done():
            await self.writes.popleft()  # raises the first failure
        while len(self.writes) > self.MAX_PENDING:
            await self.writes.popleft()

    async def _write(
        self, info: CheckedInfo, ingest: asyncio.Task[tuple[Node, int, bytes]], previous: asyncio.Task[None] | None
    ) -> None:
        if previous is not None:
            await asyncio.wait([previous])
            if previous.cancelled() or previous.exception() is not None:
                ingest.cancel()
                raise DaemonError(f"{info.store_path} was not added: a path before it failed")
        node, _, _ = await ingest
        if info.verify_content:
            await verify_content(self.s, info, node)
        await register(self.s, info, node)
        self.digests.discard(info.store_path.digest)

    def _raise_failed(self) -> None:
        for write in self.writes:
            if write.done() and not write.cancelled() and write.exception() is not None:
                raise write.exception()  # type: ignore[misc]

    async def finish(self) -> None:
        """Wait until every path read is registered (the first failure is raised)."""
        try:
            while self.writes:
                await self.writes.popleft()
        finally:
            await self.abort()

    async def settle(self) -> None:
        """After a later path failed: let the paths read before it be registered, in order."""
        try:
            await self.finish()
        except Exception as e:
            log.warning("%s: a path read before the failing one could not be added either: %s", self.s.peer, e)

    async def abort(self) -> None:
        """Stop what is still pending (data already stored stays, unreferenced, for gc)."""
        tasks = [*self.writes, *self.ingests]
        self.writes.clear()
        self.ingests.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def drain(source: FramedSource | LimitedSource) -> None:
    """Read what is left of a NAR stream, so the session stays in sync after an error."""
    if isinstance(source, FramedSource):
        await source.drain()
    else:
        while await source.read(1 << 16):
            pass
