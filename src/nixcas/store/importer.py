"""Filesystem paths and local Nix store paths into the store, with their PathInfo.

* :func:`import_path` — ``nixcas import``: the same store path as
  ``nix-store --add`` (CA ``fixed:r:sha256`` of the NAR, no references).
* :func:`copy_path` — ``nixcas copy``: a path of the local Nix store with the
  metadata Nix has for it (references, NAR hash and size, signatures, deriver,
  CA), checked against what was actually ingested.
* :func:`parse_path_infos` — the JSON that describes such paths: ``nix
  path-info --json --recursive`` (list or object form) or the ``closure`` of
  ``exportReferencesGraph``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from nixcas.castore.blob.base import BlobService
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.ingest import Progress, ingest_path
from nixcas.castore.nodes import Node
from nixcas.errors import IngestError, NixbaseError, PathInfoError, StorePathError
from nixcas.store.hashes import CAHash, CAKind, HashAlgo, NixHash
from nixcas.store.nar.hashing import NarCalculationService, NarHasher, SimpleNarCalculationService
from nixcas.store.pathinfo.base import PathInfoService
from nixcas.store.pathinfo.model import PathInfo, Signature
from nixcas.store.store_path import STORE_DIR, StorePath, build_ca_path, build_nar_path, validate_name

if TYPE_CHECKING:
    from nixcas.castore.walkproc import WalkProcess

__all__ = [
    "ExportedPathInfo",
    "copy_path",
    "import_path",
    "parse_path_infos",
    "path_to_name",
    "check_content_address",
    "references_first",
]


def path_to_name(path: str | os.PathLike[str]) -> str:
    """The store path name for importing ``path``: its last component, which must be a valid name."""
    name = Path(os.fspath(path)).name
    if not name or name in (".", ".."):
        raise StorePathError(f"{os.fspath(path)}: cannot derive a store path name (no final component)")
    try:
        return validate_name(name)
    except StorePathError as e:
        raise StorePathError(f"{os.fspath(path)}: {e}") from None


@dataclass(frozen=True)
class Services:
    """The services an import writes to."""

    blobs: BlobService
    directories: DirectoryService
    pathinfos: PathInfoService
    nar: NarCalculationService


async def ingest_and_hash(
    path: str | os.PathLike[str],
    services: Services,
    progress: Progress | None = None,
    walker: WalkProcess | None = None,
) -> tuple[Node, int, bytes]:
    """Ingest ``path``; its root node, NAR size and NAR SHA-256.

    With a local NAR calculation the NAR is hashed while the tree is read,
    from the bytes being imported (:class:`~nixcas.store.nar.hasher.NarHasher`):
    no second pass over the files and nothing read back from the store.  A
    remote NAR calculation service is asked instead.  ``walker``: the walk of
    ``path`` running in a process of its own, with a :class:`~nixcas.store.nar.hasher.NarHasher`
    as its observer; it is closed here.
    """
    if walker is not None:
        node = await ingest_path(path, services.blobs, services.directories, progress=progress, walker=walker)
        size, sha256 = walker.result()
        if type(size) is not int or type(sha256) is not bytes or len(sha256) != 32:
            raise IngestError(f"{os.fsdecode(path)}: the walking process gave no NAR hash")
        return node, size, sha256
    if isinstance(services.nar, SimpleNarCalculationService):
        hasher = NarHasher()
        try:
            node = await ingest_path(path, services.blobs, services.directories, progress=progress, observer=hasher)
            size, sha256 = await asyncio.to_thread(hasher.result)
        finally:
            await asyncio.to_thread(hasher.close)
        return node, size, sha256
    node = await ingest_path(path, services.blobs, services.directories, progress=progress)
    size, sha256 = await services.nar.calculate_nar(node)
    return node, size, sha256


async def import_path(
    path: str | os.PathLike[str],
    services: Services,
    *,
    progress: Progress | None = None,
    walker: WalkProcess | None = None,
) -> PathInfo:
    """Ingest ``path`` and register it as ``nix-store --add`` would; return its PathInfo.

    ``walker``: the walk of ``path`` started early in a process of its own (:mod:`nixcas.cli.prewalk`);
    closed here in any case.
    """
    name = path_to_name(path)
    node, nar_size, nar_sha256 = await ingest_and_hash(path, services, progress, walker)
    info = PathInfo(
        store_path=build_nar_path(name, nar_sha256),
        node=node,
        references=(),
        nar_size=nar_size,
        nar_sha256=nar_sha256,
        ca=CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, nar_sha256)),
    )
    return await services.pathinfos.put(info)


@dataclass(frozen=True)
class ExportedPathInfo:
    """What Nix reports about one path of its store."""

    store_path: StorePath
    nar_hash: NixHash
    nar_size: int
    references: tuple[StorePath, ...]
    deriver: StorePath | None = None
    signatures: tuple[Signature, ...] = ()
    ca: CAHash | None = None


def _store_path(text: object, where: str) -> StorePath:
    if not isinstance(text, str):
        raise PathInfoError(f"{where}: expected a store path string, got {text!r}")
    try:
        return StorePath.from_absolute_path(text)
    except StorePathError as e:
        raise PathInfoError(f"{where}: {e}") from None


def _deriver(text: object, where: str) -> StorePath | None:
    if text is None or text == "unknown-deriver":
        return None
    if not isinstance(text, str) or not text.endswith(".drv"):
        raise PathInfoError(f"{where}: deriver must be a .drv store path, got {text!r}")
    path = _store_path(text, where)
    return StorePath(path.digest, path.name.removesuffix(".drv"))


def _one(entry: Mapping[str, Any], path_text: str | None, where: str) -> ExportedPathInfo:
    path = _store_path(path_text if path_text is not None else entry.get("path"), where)
    where = f"{where} ({path})"
    try:
        nar_hash = NixHash.parse(str(entry["narHash"]), HashAlgo.SHA256)
        size = entry["narSize"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise PathInfoError(f"{where}: narSize must be a non-negative integer, got {size!r}")
        references = entry.get("references", [])
        if not isinstance(references, list):
            raise PathInfoError(f"{where}: references must be a list")
        signatures = entry.get("signatures") or []
        ca_text = entry.get("ca")
        ca = CAHash.parse(ca_text) if ca_text else None
    except KeyError as e:
        raise PathInfoError(f"{where}: missing field {e.args[0]!r}") from None
    except NixbaseError as e:
        raise PathInfoError(f"{where}: {e}") from None
    if nar_hash.algo is not HashAlgo.SHA256:
        raise PathInfoError(f"{where}: narHash must be sha256")
    return ExportedPathInfo(
        store_path=path,
        nar_hash=nar_hash,
        nar_size=size,
        references=tuple(_store_path(r, f"{where}: reference") for r in references),
        deriver=_deriver(entry.get("deriver"), f"{where}: deriver"),
        signatures=tuple(Signature.parse(str(s)) for s in signatures),
        ca=ca,
    )


def parse_path_infos(data: object, source: str = "input") -> list[ExportedPathInfo]:
    """Path infos from ``nix path-info --json`` (a list, or an object keyed by path) or ``{"closure": [...]}``."""
    if isinstance(data, Mapping) and "closure" in data:
        data = data["closure"]
    entries: Iterable[tuple[str | None, object]]
    if isinstance(data, list):
        entries = [(None, e) for e in data]
    elif isinstance(data, Mapping):
        entries = list(data.items())
    else:
        raise PathInfoError(
            f"{source}: expected a list of path infos, an object keyed by path, or {{'closure': [...]}}"
        )
    result: list[ExportedPathInfo] = []
    for i, (key, entry) in enumerate(entries):
        where = f"{source}: entry {i}"
        if entry is None:
            raise PathInfoError(f"{where}: {key} is not a valid path in the Nix store")
        if not isinstance(entry, Mapping):
            raise PathInfoError(f"{where}: expected an object")
        result.append(_one(entry, key, where))
    return result


def references_first(infos: Iterable[ExportedPathInfo]) -> list[ExportedPathInfo]:
    """``infos`` ordered so that every path comes after the paths it refers to (self-references aside).

    ``nix path-info --recursive`` lists paths by name, not by dependency; copying in
    this order means an interrupted copy never leaves a path whose references are missing.
    """
    by_path = {info.store_path: info for info in infos}
    ordered: list[ExportedPathInfo] = []
    state: dict[StorePath, int] = {}  # 1 = visiting, 2 = done
    for start in by_path:
        stack: list[tuple[StorePath, Iterator[StorePath]]] = []
        if state.get(start) == 2:
            continue
        state[start] = 1
        stack.append((start, iter(by_path[start].references)))
        while stack:
            path, refs = stack[-1]
            ref = next(refs, None)
            if ref is None:
                stack.pop()
                state[path] = 2
                ordered.append(by_path[path])
            elif ref != path and ref in by_path:
                if state.get(ref) == 1:
                    raise PathInfoError(f"reference cycle between {path} and {ref}")
                if ref not in state:
                    state[ref] = 1
                    stack.append((ref, iter(by_path[ref].references)))
    return ordered


class ContentAddressed(Protocol):
    """What :func:`check_content_address` looks at (a PathInfo, a narinfo, Nix's export)."""

    @property
    def store_path(self) -> StorePath: ...

    @property
    def references(self) -> tuple[StorePath, ...]: ...

    @property
    def ca(self) -> CAHash | None: ...

    @property
    def nar_hash(self) -> NixHash: ...


def check_content_address(exported: ContentAddressed) -> None:
    """A path with a CA must be the store path that CA (and its references) give; else :class:`IngestError`."""
    if exported.ca is None:
        return
    references = [r for r in exported.references if r != exported.store_path]
    self_reference = len(references) != len(exported.references)
    try:
        expected = build_ca_path(exported.store_path.name, exported.ca, references, self_reference)
    except (StorePathError, NixbaseError) as e:
        raise IngestError(f"{exported.store_path}: content address {exported.ca} is not possible here: {e}") from None
    if expected != exported.store_path:
        raise IngestError(
            f"{exported.store_path}: content address {exported.ca} with its references gives {expected} instead"
        )
    nar_sha256 = exported.ca.kind is CAKind.NAR and exported.ca.hash.algo is HashAlgo.SHA256
    if nar_sha256 and exported.ca.hash.digest != exported.nar_hash.digest:
        raise IngestError(f"{exported.store_path}: content address {exported.ca} differs from its NAR hash")


async def copy_path(
    exported: ExportedPathInfo,
    services: Services,
    *,
    store_dir: str | os.PathLike[str] = STORE_DIR,
    progress: Progress | None = None,
) -> PathInfo:
    """Ingest a path of the local Nix store and register it with Nix's metadata.

    The NAR size and hash of what was ingested must equal what Nix recorded
    (else :class:`~nixcas.errors.IngestError`; the PathInfo is not written).
    """
    check_content_address(exported)
    source = Path(os.fspath(store_dir)) / exported.store_path.basename
    node, nar_size, nar_sha256 = await ingest_and_hash(source, services, progress)
    if (nar_size, nar_sha256) != (exported.nar_size, exported.nar_hash.digest):
        raise IngestError(
            f"{source}: content does not match Nix's record: NAR {nar_size} bytes "
            f"{NixHash(HashAlgo.SHA256, nar_sha256).to_nix32()}, expected {exported.nar_size} bytes "
            f"{exported.nar_hash.to_nix32()}"
        )
    info = PathInfo(
        store_path=exported.store_path,
        node=node,
        references=exported.references,
        nar_size=nar_size,
        nar_sha256=nar_sha256,
        signatures=exported.signatures,
        deriver=exported.deriver,
        ca=exported.ca,
    )
    return await services.pathinfos.put(info)
