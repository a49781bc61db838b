"""One handler per worker-protocol operation, over the store's services.

Each handler reads its operation's arguments, then works, then answers with
``STDERR_LAST`` and its result (see :mod:`~nixcas.store.daemon.session`).
Operations nixcas cannot serve end with an error frame; the ones whose
arguments are known are read first, so the session goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nixcas.castore.nodes import DirectoryNode, FileNode, Node
from nixcas.errors import NixbaseError, PathInfoError, StorePathError, ValidationError
from nixcas.store import nixbase32
from nixcas.store.daemon.protocol import BuildStatus, Op
from nixcas.store.daemon.session import DaemonError, Session, SessionEnd
from nixcas.store.daemon.wire import FramedSource, LimitedSource, ProtocolError, TunnelSource, WireReader
from nixcas.store.hashes import CAHash, CAKind, HashAlgo, NixHash
from nixcas.store.pathinfo.model import PathInfo, Signature
from nixcas.store.store_path import STORE_DIR_PREFIX, StorePath, validate_name

if TYPE_CHECKING:
    from nixcas.castore.blob.base import BlobService
    from nixcas.castore.digest import B3Digest
    from nixcas.castore.dirs.base import DirectoryService
    from nixcas.castore.pins.base import PinService
    from nixcas.store.pathinfo.base import PathInfoService
    from nixcas.store.signing import VerifyingKey

__all__ = ["HANDLERS", "DaemonState"]

log = logging.getLogger("nixcas.nix-daemon")

MAX_PATH = 4096
"""Longest store path string accepted."""
MAX_SIG = 1024
NO_BUILD = "nixcas does not build"
GET_CONCURRENCY = 16
"""Path info lookups in flight for one list query."""


def _host() -> str:
    """This host's name as pin names may hold it (no whitespace or '/')."""
    return "".join(c if c.isprintable() and not c.isspace() and c != "/" else "_" for c in socket.gethostname())[:64]


TEMP_ROOT_PREFIX = f"nix-temp-{_host()}-"
"""Temporary roots are pins named ``nix-temp-HOST-PID-SESSION-HASH``: another host's are never touched."""


@dataclass
class DaemonState:
    """What every session shares: the services, the signature policy, the GC-root naming."""

    blobs: BlobService
    directories: DirectoryService
    pathinfos: PathInfoService
    pins: PinService | None = None
    trusted_keys: tuple[VerifyingKey, ...] = ()
    require_sigs: bool = True
    """Whether a trusted client's 'check signatures' request is honoured (untrusted clients are always checked)."""
    root_prefix: str = field(default_factory=lambda: f"{TEMP_ROOT_PREFIX}{os.getpid()}-")
    """Names of this process's temporary-root pins start with this (host name and PID)."""

    def __post_init__(self) -> None:
        from nixcas.bridge.groupsync import GroupSync

        self.blob_sync = GroupSync(self.blobs.sync)
        """The durability barrier before directories commit, shared by every upload waiting for one."""

    async def get(self, path: StorePath) -> PathInfo | None:
        return await self.pathinfos.get(path.digest)

    async def get_many(self, paths: list[StorePath]) -> list[PathInfo | None]:
        """The path infos of ``paths`` (``None`` for invalid ones), looked up a few at a time."""
        found: list[PathInfo | None] = []
        for i in range(0, len(paths), GET_CONCURRENCY):
            found += await asyncio.gather(*(self.get(p) for p in paths[i : i + GET_CONCURRENCY]))
        return found

    async def require(self, path: StorePath) -> PathInfo:
        info = await self.get(path)
        if info is None:
            raise DaemonError(f"path '{path}' is not valid")
        return info

    async def referrers(self, path: StorePath) -> list[StorePath]:
        """Every valid path whose references include ``path`` (one pass over the path infos)."""
        found = []
        async for info in self.pathinfos.list():
            if any(ref.digest == path.digest for ref in info.references):
                found.append(info.store_path)
        return found

    async def pin(self, name: str, node: Node) -> bool:
        """Pin ``node``'s data as ``name`` (nothing to pin for a symlink); whether a pin was made."""
        digest = _node_digest(node)
        if self.pins is None or digest is None:
            return False
        await self.pins.pin(name, digest)
        return True

    async def unpin(self, names: Iterable[str]) -> None:
        if self.pins is None:
            return
        for name in names:
            with contextlib.suppress(Exception):
                await self.pins.unpin(name)

    async def release_stale_temp_roots(self) -> int:
        """Unpin the temporary roots a daemon process left behind when it was killed; how many."""
        if self.pins is None:
            return 0
        stale = []
        for pin in await self.pins.list():
            if not pin.name.startswith(TEMP_ROOT_PREFIX) or pin.name.startswith(self.root_prefix):
                continue
            pid_text = pin.name.removeprefix(TEMP_ROOT_PREFIX).split("-", 1)[0]
            if pid_text.isdigit() and not _alive(int(pid_text)):
                stale.append(pin.name)
        await self.unpin(stale)
        return len(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _node_digest(node: Node) -> B3Digest | None:
    if isinstance(node, DirectoryNode | FileNode):
        return node.digest
    return None


# -- argument parsing (after every argument was read: errors keep the session in sync) ---------------


def parse_path(text: str) -> StorePath:
    try:
        return StorePath.from_absolute_path(text)
    except StorePathError as e:
        raise DaemonError(str(e)) from None


def parse_optional_path(text: str) -> StorePath | None:
    return None if text == "" else parse_path(text)


def parse_deriver(text: str) -> StorePath | None:
    if text == "":
        return None
    path = parse_path(text)
    if not path.name.endswith(".drv"):
        raise DaemonError(f"deriver '{text}' is not a .drv path")
    return StorePath(path.digest, path.name.removesuffix(".drv"))


def show_deriver(deriver: StorePath | None) -> str:
    return "" if deriver is None else f"{STORE_DIR_PREFIX}{deriver.basename}.drv"


async def read_path(s: Session) -> str:
    return await s.wire.text(MAX_PATH, "store path")


async def read_paths(s: Session) -> list[str]:
    return await s.wire.texts(MAX_PATH, "store path")


def write_path_info(s: Session, info: PathInfo) -> None:
    """The path info without its path (``UnkeyedValidPathInfo``), as the session's minor has it."""
    s.out.text(show_deriver(info.deriver))
    s.out.text(info.nar_sha256.hex())
    s.out.texts(sorted(str(r) for r in info.references))
    s.out.u64(0)  # registration time: not recorded
    s.out.u64(info.nar_size)
    if s.minor >= 16:
        s.out.flag(False)  # ultimate: nixcas built nothing
        s.out.texts(str(sig) for sig in info.signatures)
        s.out.text("" if info.ca is None else str(info.ca))


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


# -- queries ----------------------------------------------------------------------------------------


async def is_valid_path(s: Session) -> None:
    path = parse_path(await read_path(s))
    valid = await s.state.get(path) is not None
    s.last().flag(valid)


async def query_valid_paths(s: Session) -> None:
    texts = await read_paths(s)
    if s.minor >= 27:
        await s.wire.u64()  # substitute: the path info service reaches any configured upstream itself
    paths = [parse_path(t) for t in texts]
    found = await s.state.get_many(paths)
    s.last().texts(str(p) for p, info in zip(paths, found, strict=True) if info is not None)


async def query_path_info(s: Session) -> None:
    path = parse_path(await read_path(s))
    info = await s.state.get(path)
    s.last()
    if info is None:
        s.out.u64(0)
        return
    s.out.u64(1)
    write_path_info(s, info)


async def query_path_from_hash_part(s: Session) -> None:
    hash_part = await s.wire.text(MAX_PATH, "hash part")
    found = ""
    if nixbase32.is_valid(hash_part) and len(hash_part) == 32:
        info = await s.state.pathinfos.get(nixbase32.decode(hash_part))
        if info is not None:
            found = str(info.store_path)
    s.last().text(found)


async def query_referrers(s: Session) -> None:
    path = parse_path(await read_path(s))
    referrers = await s.state.referrers(path)
    s.last().texts(sorted(str(p) for p in referrers))


async def query_all_valid_paths(s: Session) -> None:
    paths = [str(info.store_path) async for info in s.state.pathinfos.list()]
    s.last().texts(sorted(paths))


async def query_deriver(s: Session) -> None:
    path = parse_path(await read_path(s))
    info = await s.state.require(path)
    s.last().text(show_deriver(info.deriver))


async def empty_path_set(s: Session) -> None:
    """QueryValidDerivers / QueryDerivationOutputs: nixcas records no derivations."""
    parse_path(await read_path(s))
    s.last().u64(0)


async def query_derivation_output_map(s: Session) -> None:
    parse_path(await read_path(s))
    s.last().u64(0)  # an empty map


async def query_realisation(s: Session) -> None:
    await s.wire.text(MAX_PATH, "derivation output")
    s.last().u64(0)  # no realisation (an empty set of paths or of realisations, by minor)


async def query_substitutable_paths(s: Session) -> None:
    texts = await read_paths(s)
    for t in texts:
        parse_path(t)
    s.last().u64(0)  # an invalid path is one no configured upstream has either


async def query_substitutable_path_info(s: Session) -> None:
    parse_path(await read_path(s))
    s.last().u64(0)


async def query_substitutable_path_infos(s: Session) -> None:
    count = await s.wire.small(1 << 20, "number of paths")
    texts = []
    for _ in range(count):  # the whole request is read before a bad path is refused: the session stays in step
        texts.append(await read_path(s))
        if s.minor >= 22:
            await s.wire.text(300, "content address")
    for text in texts:
        parse_path(text)
    s.last().u64(0)


def _split_derived(text: str) -> tuple[StorePath, str | None]:
    """A DerivedPath string: a store path, or ``<drv>!<outputs>``."""
    base, bang, outputs = text.partition("!")
    return parse_path(base), (outputs if bang else None)


async def query_missing(s: Session) -> None:
    targets = await s.wire.texts(MAX_PATH + 1024, "derived path")
    unknown = []
    for text in targets:
        path, outputs = _split_derived(text)
        if outputs is not None or await s.state.get(path) is None:
            unknown.append(str(path))
    s.last()
    s.out.u64(0)  # will build
    s.out.u64(0)  # will substitute
    s.out.texts(sorted(set(unknown)))
    s.out.u64(0).u64(0)  # download size, NAR size


async def _ensure_valid(s: Session, targets: list[str]) -> None:
    for text in targets:
        path, outputs = _split_derived(text)
        if outputs is not None:
            raise DaemonError(f"{NO_BUILD}: cannot build '{text}' (only valid or substitutable paths are served)")
        if await s.state.get(path) is None:
            raise DaemonError(f"{NO_BUILD}: path '{path}' is not valid and no configured upstream has it")


async def _build_mode(s: Session) -> None:
    mode = await s.wire.small(2, "build mode")
    if mode == 1 and not s.trusted:
        raise DaemonError("repairing is not allowed because you are not in 'trusted-users'")
    if mode == 2:
        raise DaemonError(f"{NO_BUILD}: cannot check (rebuild) paths")


async def ensure_path(s: Session) -> None:
    text = await read_path(s)
    await _ensure_valid(s, [text])
    s.last().u64(1)


async def build_paths(s: Session) -> None:
    targets = await s.wire.texts(MAX_PATH + 1024, "derived path")
    await _build_mode(s)
    await _ensure_valid(s, targets)
    s.last().u64(1)


async def build_paths_with_results(s: Session) -> None:
    targets = await s.wire.texts(MAX_PATH + 1024, "derived path")
    await _build_mode(s)
    await _ensure_valid(s, targets)
    s.last().u64(len(targets))
    for text in targets:
        s.out.text(text)
        s.out.u64(BuildStatus.ALREADY_VALID).text("")
        if s.minor >= 29:
            s.out.u64(0).flag(False).u64(0).u64(0)  # times built, non-deterministic, start and stop time
        if s.minor >= 37:
            s.out.u64(0).u64(0)  # no CPU times (user, system)
        if s.minor >= 28:
            s.out.u64(0)  # no built outputs


# -- adding paths ---------------------------------------------------------------------------------------


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


# -- GC roots -------------------------------------------------------------------------------------------


def _root_name(kind: str, location: str) -> str:
    name = f"nix-{kind}:" + urllib.parse.quote(location, safe="")
    if len(name) > 255:
        raise DaemonError(f"GC root location '{location[:100]}' is too long to name a pin")
    return name


MAX_TEMP_ROOTS = 100_000
"""Temporary roots one session may hold (each is kept until the client disconnects)."""


async def add_temp_root(s: Session) -> None:
    path = parse_path(await read_path(s))
    if path.digest not in s.temp_roots and len(s.temp_roots) >= MAX_TEMP_ROOTS:
        raise DaemonError(f"this session already holds {MAX_TEMP_ROOTS} temporary roots")
    if path.digest not in s.temp_roots:
        s.temp_roots[path.digest] = ""
        info = await s.state.get(path)
        if info is not None:
            name = s.state.root_prefix + f"{s.id}-{path.hash_part}"
            if await s.state.pin(name, info.node):
                s.temp_roots[path.digest] = name
    s.last().u64(1)


async def add_indirect_root(s: Session) -> None:
    location = await s.wire.text(MAX_PATH, "GC root location")
    if not s.trusted:
        raise DaemonError("you are not privileged to create indirect roots")
    try:
        target = os.readlink(location)
    except OSError as e:
        raise DaemonError(f"cannot read the GC root symlink '{location}': {e.strerror}") from None
    info = await s.state.require(parse_path(target))
    await s.state.pin(_root_name("indirect", os.path.abspath(location)), info.node)
    s.last().u64(1)


async def add_perm_root(s: Session) -> None:
    path = parse_path(await read_path(s))
    location = await s.wire.text(MAX_PATH, "GC root location")
    if not s.trusted:
        raise DaemonError("you are not privileged to create perm roots")
    info = await s.state.require(path)
    location = os.path.abspath(location)
    await s.state.pin(_root_name("perm", location), info.node)
    s.last().text(location)


async def sync_with_gc(s: Session) -> None:
    s.last().u64(1)


# -- maintenance --------------------------------------------------------------------------------------


async def set_options(s: Session) -> None:
    for _ in range(12):  # keepFailed … useSubstitutes (nothing here builds or substitutes per client)
        await s.wire.u64()
    if s.minor >= 12:
        count = await s.wire.small(4096, "number of options")
        for _ in range(count):
            await s.wire.text(4096, "option name")
            await s.wire.text(MAX_PATH * 16, "option value")
    s.last()


async def optimise_store(s: Session) -> None:
    s.last().u64(1)  # blobs are deduplicated by content already


async def verify_store(s: Session) -> None:
    check_contents = await s.wire.flag()
    repair = await s.wire.flag()
    if repair:
        raise DaemonError(
            "you are not privileged to repair paths"
            if not s.trusted
            else "nixcas cannot repair through the daemon; run 'nixcas fsck --repair-from …'"
        )
    from nixcas.store.fsck import fsck

    report = await fsck(
        s.state.blobs, s.state.directories, s.state.pathinfos, s.state.pins, check_contents=check_contents
    )
    for problem in report.remaining[:100]:
        await s.message(f"nixcas fsck: {problem}")
    s.last().flag(bool(report.remaining))


# -- operations nixcas refuses, with known arguments (the session goes on) ------------------------------


async def _refuse(text: str) -> None:
    raise DaemonError(f"nixcas nix-daemon: {text}")


async def add_to_store(s: Session) -> None:
    """A path added by content (``nix-store --add``, ``nix store add-path``): the NAR method with SHA-256 only."""
    if s.minor < 25:
        raise ProtocolError("AddToStore before protocol 1.25 is not supported")
    name = await s.wire.text(MAX_PATH, "name")
    method = await s.wire.text(300, "content address method")
    ref_texts = await read_paths(s)
    await s.wire.u64()  # repair
    source = FramedSource(s.wire)
    try:
        if method != "fixed:r:sha256":
            raise DaemonError(
                f"nixcas nix-daemon: AddToStore with method '{method}' is not supported (only fixed:r:sha256, "
                "the NAR of a path, as nix-store --add sends it); add the path locally and copy it"
            )
        try:
            validate_name(name)
        except StorePathError as e:
            raise DaemonError(str(e)) from None
        references = tuple(parse_path(r) for r in ref_texts)
        missing = [str(r) for r in references if await s.state.get(r) is None]
        if missing:
            raise DaemonError(f"cannot add '{name}': its references are not valid here: {', '.join(missing[:5])}")
        from nixcas.store.nar.ingest import ingest_nar
        from nixcas.store.store_path import build_ca_path

        node, size, sha256 = await ingest_nar(source, s.state.blobs, s.state.directories, sync=s.state.blob_sync.sync)
        ca = CAHash.nar(HashAlgo.SHA256, sha256)
        path = build_ca_path(name, ca, references)
        info = await s.state.get(path)
        if info is None:
            checked = CheckedInfo(path, None, sha256, references, size, (), ca)
            info = await register(s, checked, node)
    except Exception as e:
        await source.drain()  # a broken connection raises here: the session ends
        if isinstance(e, ProtocolError):
            raise DaemonError(str(e)) from None
        raise
    await source.drain()
    s.last().text(str(info.store_path))
    write_path_info(s, info)


async def add_build_log(s: Session) -> None:
    await read_path(s)
    await FramedSource(s.wire).drain()
    await _refuse("build logs are not stored")


async def add_text_to_store(s: Session) -> None:
    await s.wire.text(MAX_PATH, "name")
    await s.wire.raw(64 << 20, "text")
    await read_paths(s)
    await _refuse("AddTextToStore is not supported")


async def find_roots(s: Session) -> None:
    await _refuse("FindRoots is not supported; see 'nixcas castore pins'")


async def collect_garbage(s: Session) -> None:
    await s.wire.u64()  # action
    await read_paths(s)
    for _ in range(5):  # ignore liveness, max freed, three obsolete fields
        await s.wire.u64()
    await _refuse("garbage is collected with 'nixcas gc', not through the daemon")


Handler = Callable[[Session], Awaitable[None]]

HANDLERS: dict[int, Handler] = {
    Op.IS_VALID_PATH: is_valid_path,
    Op.QUERY_VALID_PATHS: query_valid_paths,
    Op.QUERY_PATH_INFO: query_path_info,
    Op.QUERY_PATH_FROM_HASH_PART: query_path_from_hash_part,
    Op.QUERY_REFERRERS: query_referrers,
    Op.QUERY_ALL_VALID_PATHS: query_all_valid_paths,
    Op.QUERY_DERIVER: query_deriver,
    Op.QUERY_VALID_DERIVERS: empty_path_set,
    Op.QUERY_DERIVATION_OUTPUTS: empty_path_set,
    Op.QUERY_DERIVATION_OUTPUT_MAP: query_derivation_output_map,
    Op.QUERY_REALISATION: query_realisation,
    Op.QUERY_SUBSTITUTABLE_PATHS: query_substitutable_paths,
    Op.QUERY_SUBSTITUTABLE_PATH_INFO: query_substitutable_path_info,
    Op.QUERY_SUBSTITUTABLE_PATH_INFOS: query_substitutable_path_infos,
    Op.QUERY_MISSING: query_missing,
    Op.ENSURE_PATH: ensure_path,
    Op.BUILD_PATHS: build_paths,
    Op.BUILD_PATHS_WITH_RESULTS: build_paths_with_results,
    Op.ADD_TO_STORE_NAR: add_to_store_nar,
    Op.ADD_MULTIPLE_TO_STORE: add_multiple_to_store,
    Op.ADD_SIGNATURES: add_signatures,
    Op.NAR_FROM_PATH: nar_from_path,
    Op.ADD_TEMP_ROOT: add_temp_root,
    Op.ADD_INDIRECT_ROOT: add_indirect_root,
    Op.ADD_PERM_ROOT: add_perm_root,
    Op.SYNC_WITH_GC: sync_with_gc,
    Op.SET_OPTIONS: set_options,
    Op.OPTIMISE_STORE: optimise_store,
    Op.VERIFY_STORE: verify_store,
    Op.ADD_TO_STORE: add_to_store,
    Op.ADD_BUILD_LOG: add_build_log,
    Op.ADD_TEXT_TO_STORE: add_text_to_store,
    Op.FIND_ROOTS: find_roots,
    Op.COLLECT_GARBAGE: collect_garbage,
}
"""Every operation served (or refused after reading its arguments); any other ends the session."""
