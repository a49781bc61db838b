"""``nixcas fsck``: verify the whole store, report each problem with its path, repair from another store.

Checked: every PathInfo's tree (problems are reported as
``/nix/store/…-name/sub/path``), every pin's tree (``pin NAME/…``), every
stored directory (re-hashed, closure complete) and, with ``check_contents``,
every stored blob and chunk read back and hashed; with ``check_nar`` every
PathInfo's NAR is rendered and its size and SHA-256 compared with the
record.  With a repair source, damaged or missing objects (and PathInfos
whose NAR does not match) are fetched from it, verified, and the store is
checked again; what remains is reported.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from nixcas.castore.blob.base import BlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.fsck import CastoreChecker, CastoreRepairer, CheckableOutboards, Problem
from nixcas.castore.nodes import DirectoryNode, FileNode
from nixcas.castore.pins import PinService
from nixcas.castore.sweep import SweepableBlobs, SweepableDirectories
from nixcas.errors import NixcasError
from nixcas.store import nixbase32
from nixcas.store.hashes import HashAlgo, NixHash
from nixcas.store.nar.source import NarSource
from nixcas.store.pathinfo.base import PathInfoService
from nixcas.store.pathinfo.model import PathInfo
from nixcas.store.store_path import STORE_DIR, StorePath

__all__ = ["FsckReport", "RepairSource", "fsck"]

REPAIR_ROUNDS = 3
"""Repair, re-check, repeat (a refetched directory may reveal missing blobs below it)."""


@dataclass(frozen=True)
class RepairSource:
    """The store damaged objects are fetched from."""

    blobs: BlobService
    directories: DirectoryService
    pathinfos: PathInfoService | None


@dataclass
class FsckReport:
    found: list[Problem] = field(default_factory=list)
    """Everything wrong at the first check."""
    repaired: list[Problem] = field(default_factory=list)
    remaining: list[Problem] = field(default_factory=list)
    """Still wrong at the end (== ``found`` without a repair source)."""
    checked_paths: int = 0
    checked_objects: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "checked_paths": self.checked_paths,
            "checked_objects": self.checked_objects,
            "found": [p.to_json() for p in self.found],
            "repaired": [p.to_json() for p in self.repaired],
            "remaining": [p.to_json() for p in self.remaining],
        }


@dataclass
class _Pass:
    blobs: BlobService
    directories: DirectoryService
    pathinfos: PathInfoService | None
    pins: PinService | None
    check_contents: bool
    check_nar: bool
    on_object: Callable[[], None] | None
    infos: dict[StorePath, PathInfo] = field(default_factory=dict)
    objects: int = 0

    async def problems(self) -> AsyncIterator[Problem]:
        checker = CastoreChecker(self.blobs, self.directories, check_contents=self.check_contents)

        def counted() -> None:
            self.objects += 1
            if self.on_object is not None:
                self.on_object()

        checker.on_object = counted
        if self.pathinfos is not None:
            async for digest, info in self.pathinfos.list_checked():
                if isinstance(info, PathInfo):
                    self.infos[info.store_path] = info
                else:
                    where = f"{STORE_DIR}/{nixbase32.encode(digest)}"
                    yield Problem(where, "pathinfo-record", nixbase32.encode(digest), f"is invalid: {info}")
        for path, info in sorted(self.infos.items(), key=lambda kv: str(kv[0])):
            async for problem in checker.walk(str(path), info.node):
                yield problem
        if self.pins is not None:
            for pin in await self.pins.list():
                found = await checker.directory(pin.digest)
                if not isinstance(found, str):
                    node: DirectoryNode | FileNode = found.node(self.directories.size_rule)
                elif await self.blobs.has(pin.digest):
                    node = FileNode(pin.digest, 0)  # size unknown: only presence and contents are checked
                    trouble, _ = await checker.blob(pin.digest)
                    if trouble is not None:
                        yield checker.blob_problem(f"pin {pin.name}", pin.digest, trouble)
                    continue
                else:
                    yield Problem(f"pin {pin.name}", "object", pin.digest.hex(), "is missing")
                    continue
                async for problem in checker.walk(f"pin {pin.name}", node):
                    yield problem
        if isinstance(self.directories, SweepableDirectories):
            async for problem in checker.stored_directories(self.directories):
                yield problem
        if isinstance(self.blobs, SweepableBlobs):
            async for problem in checker.stored_blobs(self.blobs):
                yield problem
        if isinstance(self.blobs, CheckableOutboards):
            async for problem in checker.stored_outboards(self.blobs):
                yield problem
        if self.check_nar:
            for _, info in sorted(self.infos.items(), key=lambda kv: str(kv[0])):
                wrong = await self.nar_problem(info)
                if wrong is not None:
                    yield wrong

    async def nar_problem(self, info: PathInfo) -> Problem | None:
        try:
            size, sha256 = await NarSource(info.node, self.blobs, self.directories).size_sha256()
        except NixcasError as e:
            return Problem(str(info.store_path), "pathinfo", str(info.store_path), f"NAR cannot be rendered: {e}")
        if size != info.nar_size or sha256 != info.nar_sha256:
            got = NixHash(HashAlgo.SHA256, sha256).to_sri()
            recorded = f"{info.nar_hash.to_sri()} {info.nar_size}"
            path = str(info.store_path)
            return Problem(path, "pathinfo", path, f"NarHash/NarSize recorded {recorded}, content gives {got} {size}")
        return None


async def fsck(
    blobs: BlobService,
    directories: DirectoryService,
    pathinfos: PathInfoService | None,
    pins: PinService | None,
    *,
    check_contents: bool = False,
    check_nar: bool = False,
    repair_from: RepairSource | None = None,
    on_problem: Callable[[Problem], None] | None = None,
    on_object: Callable[[], None] | None = None,
) -> FsckReport:
    """Check the store (see the module docstring); repair from ``repair_from`` if given."""
    report = FsckReport()

    async def check() -> tuple[list[Problem], _Pass]:
        one = _Pass(blobs, directories, pathinfos, pins, check_contents, check_nar, on_object)
        problems = [p async for p in one.problems()]
        return problems, one

    problems, first = await check()
    report.found = problems
    report.checked_paths = len(first.infos)
    report.checked_objects = first.objects
    if on_problem is not None:
        for p in problems:
            on_problem(p)
    if repair_from is not None and problems:
        repairer = CastoreRepairer(blobs, directories, repair_from.blobs, repair_from.directories)
        done: set[tuple[str, str]] = set()
        infos = first.infos
        for _ in range(REPAIR_ROUNDS):
            progress = False
            for problem in problems:
                key = (problem.kind, problem.name)
                if key in done:
                    continue
                done.add(key)
                if await _repair(problem, repairer, repair_from, pathinfos, infos):
                    progress = True
            problems, again = await check()
            infos = again.infos
            if not problems or not progress:
                break
        remaining = {(p.kind, p.name) for p in problems}
        report.repaired = [p for p in report.found if (p.kind, p.name) not in remaining]
    report.remaining = problems
    return report


async def _repair(
    problem: Problem,
    repairer: CastoreRepairer,
    source: RepairSource,
    pathinfos: PathInfoService | None,
    infos: dict[StorePath, PathInfo],
) -> bool:
    """Fix one problem from the source; whether something was fetched or dropped."""
    if problem.kind == "pathinfo":
        path = StorePath.parse(problem.name)
        if source.pathinfos is None or pathinfos is None:
            return False
        theirs = await source.pathinfos.get(path.digest)
        if theirs is None or theirs.store_path != path:
            return False
        await repairer.tree(theirs.node)
        await pathinfos.put(theirs)
        return True
    if problem.kind == "pathinfo-record":
        digest = nixbase32.decode(problem.name)
        theirs = None if source.pathinfos is None else await source.pathinfos.get(digest)
        if theirs is None or pathinfos is None:
            return False
        await repairer.tree(theirs.node)
        await pathinfos.put(theirs)
        return True
    if problem.kind == "object":
        return False
    digest = B3Digest(bytes.fromhex(problem.name))
    if problem.kind == "directory":
        return await repairer.directory(digest)
    if problem.kind == "blob":
        return await repairer.blob(digest)
    if problem.kind == "chunk":
        await repairer.chunk(digest)
        return True
    if problem.kind == "outboard":
        return await repairer.outboard(digest)
    return False
