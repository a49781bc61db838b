"""Handlers of maintenance operations, and of those nixcas refuses after reading their arguments."""

from __future__ import annotations

from nixcas.errors import StorePathError
from nixcas.store.daemon.ops.args import parse_path, read_path, read_paths, write_path_info
from nixcas.store.daemon.ops.incoming import CheckedInfo, register
from nixcas.store.daemon.ops.state import MAX_PATH
from nixcas.store.daemon.session import DaemonError, Session
from nixcas.store.daemon.wire import FramedSource, ProtocolError
from nixcas.store.hashes import CAHash, HashAlgo
from nixcas.store.store_path import validate_name


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
