"""Handlers of the query operations (valid paths, path infos, referrers, substitutes, missing)."""

from __future__ import annotations

from nixcas.store import nixbase32
from nixcas.store.daemon.ops.args import parse_path, read_path, read_paths, show_deriver, write_path_info
from nixcas.store.daemon.ops.state import MAX_PATH, NO_BUILD
from nixcas.store.daemon.protocol import BuildStatus
from nixcas.store.daemon.session import DaemonError, Session
from nixcas.store.store_path import StorePath


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
