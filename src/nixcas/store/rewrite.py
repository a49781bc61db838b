"""``nixcas castore rewrite-directories``: convert a store from one directory size rule to the other.

A Directory's digest depends on the sizes it records for its sub-directories,
and those depend on the rule (:mod:`nixcas.castore.sizerule`); so converting
a store means writing every referenced tree again and pointing every
reference at the new root.  For each root (the node of every PathInfo, every
pin of a directory, every directory node in the bridge's NAR index):

1. its closure is read and classified: it follows the store's current rule
   (to do), the target rule (done by an earlier, interrupted run), or both
   (no file or symlink below its top level: the same bytes under either rule,
   nothing to do);
2. a closure to do is rebuilt bottom-up under the target rule and uploaded as
   one validated, atomic closure (nothing refers to it yet);
3. the reference is switched to the new root (one write).

Each write is one step and is durable on its own, so a run killed at any point
(``kill -9``) leaves every reference pointing at a complete tree of one rule
or the other; running the command again finds what is left and finishes.
Only when every root has been converted is the target rule recorded as the
store's rule; until then the store keeps its old rule (and ``nixcas fsck``
reports the roots already converted, which is the sign of an unfinished run).
The old directories are then referenced by nothing: the next ``nixcas gc``
frees them (after its grace period).  Directories reachable from no root are
not converted: they are garbage already.

Run it while nothing else writes to the store: a writer that keeps the old
rule after the command has recorded the new one would write trees the store
then refuses.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.graph import leaves_first
from nixcas.castore.nodes import DirectoryNode, Node
from nixcas.castore.pins.base import PinService
from nixcas.castore.sizerule import SizeRule
from nixcas.errors import ConfigurationError, StorageError
from nixcas.store.narindex import NarIndex
from nixcas.store.pathinfo.base import PathInfoService

__all__ = ["RewriteReport", "rewrite_directories"]

MEMO_LIMIT = 1 << 20
"""Most converted directories remembered across roots (shared subtrees are converted once while it holds)."""


@dataclass
class RewriteReport:
    """What a run did (or, with ``dry_run``, would do)."""

    source: SizeRule
    target: SizeRule
    dry_run: bool = False
    roots: int = 0
    """Root references looked at (PathInfos, pins and NAR index entries of directories)."""
    converted: int = 0
    """References switched to a tree of the target rule (or that would be, in a dry run)."""
    already: int = 0
    """References that already pointed at a tree of the target rule (an earlier run's work)."""
    unchanged: int = 0
    """References to trees that are the same under both rules."""
    directories_written: int = 0
    """Directories of the target rule uploaded (in a dry run: that would be)."""
    missing: list[str] = field(default_factory=list)
    """Roots whose directory is not in the store (left alone; ``nixcas fsck`` reports them)."""
    recorded: bool = False
    """Whether the store now records the target rule."""

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self) | {"source": self.source.value, "target": self.target.value}


@contextlib.contextmanager
def _following(directories: DirectoryService, rule: SizeRule) -> Iterator[None]:
    """``directories`` reads and writes trees of ``rule`` inside the block (the run owns the service)."""
    saved = directories.size_rule
    directories.size_rule = rule
    try:
        yield
    finally:
        directories.size_rule = saved


def _follows(closure: dict[B3Digest, Directory], root: B3Digest, rule: SizeRule, recorded: int | None) -> bool:
    """Whether every size recorded in ``closure`` (and ``recorded``, the root's, if known) follows ``rule``."""
    if recorded is not None and recorded != closure[root].size_under(rule):
        return False
    for directory in closure.values():
        for _, child in directory.directories():
            below = closure.get(child.digest)
            if below is None or below.size_under(rule) != child.size:
                return False
    return True


class _Rewriter:
    def __init__(
        self,
        directories: DirectoryService,
        target: SizeRule,
        report: RewriteReport,
        step: Callable[[int], None] | None,
    ) -> None:
        self.directories = directories
        self.target = target
        self.source = target.other
        self.report = report
        self._step = step
        self._steps = 0
        self._memo: dict[B3Digest, Directory] = {}
        """Converted directories by their source digest."""
        self._converted: dict[B3Digest, Directory] = {}
        """The same directories by their own digest."""

    def stepped(self) -> None:
        self._steps += 1
        if self._step is not None:
            self._step(self._steps)

    async def _closure(self, root: B3Digest) -> dict[B3Digest, Directory]:
        """The closure of ``root`` by digest (empty if the root is absent), of whichever rule it follows."""
        try:
            with _following(self.directories, self.source):
                return {d.digest: d async for d in self.directories.get_recursive(root)}
        except StorageError:
            # object stores check sizes as they read: a tree an earlier run converted reads under the target rule
            with _following(self.directories, self.target):
                return {d.digest: d async for d in self.directories.get_recursive(root)}

    def converted_before(self, new: DirectoryNode) -> DirectoryNode:
        """A reference to a root this run already converted (the same tree, so the same answer)."""
        self.report.roots += 1
        self.report.converted += 1
        return new

    async def convert(self, node: DirectoryNode | B3Digest, where: str) -> DirectoryNode | None:
        """The node to refer to instead (``None``: keep the reference as it is)."""
        self.report.roots += 1
        digest, recorded = (node.digest, node.size) if isinstance(node, DirectoryNode) else (node, None)
        closure = await self._closure(digest)
        if digest not in closure:
            self.report.missing.append(f"{where}: directory {digest.hex()}")
            return None
        from_source = _follows(closure, digest, self.source, recorded)
        from_target = _follows(closure, digest, self.target, recorded)
        if from_target:
            if from_source:
                self.report.unchanged += 1
            else:
                self.report.already += 1
            return None
        if not from_source:
            raise StorageError(
                f"{where}: the tree of directory {digest.hex()} follows neither size rule (run nixcas fsck)"
            )
        new_root = await self._rebuild(closure, digest)
        self.report.converted += 1
        return new_root.node(self.target)

    async def _rebuild(self, closure: dict[B3Digest, Directory], root: B3Digest) -> Directory:
        """The closure under the target rule, uploaded (unless a dry run); its new root."""
        fresh: list[Directory] = []
        for directory in leaves_first([closure[root], *(d for d in closure.values() if d.digest != root)]):
            if directory.digest in self._memo:
                continue
            entries: list[tuple[bytes, Node]] = []
            for name, child in directory:
                if isinstance(child, DirectoryNode):
                    child = self._memo[child.digest].node(self.target)
                entries.append((name, child))
            converted = Directory(entries, _names_checked=True)
            self._memo[directory.digest] = converted
            self._converted[converted.digest] = converted
            fresh.append(converted)
        new_root = self._memo[root]
        upload = self._closure_of(new_root.digest, self._converted)
        self.report.directories_written += len(fresh)
        if not self.report.dry_run:
            with _following(self.directories, self.target):
                async with self.directories.put_multiple_start() as putter:
                    for directory in upload:
                        await putter.put(directory)
                    got = await putter.close()
            if got != new_root.digest:
                raise StorageError(f"directory service stored root {got.hex()}, expected {new_root.digest.hex()}")
            self.stepped()
        if len(self._memo) > MEMO_LIMIT:
            self._memo.clear()
            self._converted.clear()
        return new_root

    @staticmethod
    def _closure_of(root: B3Digest, known: dict[B3Digest, Directory]) -> list[Directory]:
        """The whole converted closure of ``root``, leaves first (the upload is validated as one closure)."""
        seen: dict[B3Digest, Directory] = {}
        stack = [root]
        while stack:
            digest = stack.pop()
            if digest in seen:
                continue
            directory = known[digest]
            seen[digest] = directory
            stack.extend(child.digest for _, child in directory.directories())
        ordered = [seen[root], *(d for d in seen.values() if d.digest != root)]
        return leaves_first(ordered)


async def rewrite_directories(
    directories: DirectoryService,
    target: SizeRule,
    *,
    pathinfos: PathInfoService | None = None,
    pins: PinService | None = None,
    nar_index: NarIndex | None = None,
    dry_run: bool = False,
    step: Callable[[int], None] | None = None,
) -> RewriteReport:
    """Convert every root's tree to ``target`` and switch the references; finally record ``target``
    (not while a root's tree is missing: ``nixcas fsck`` first, then run it again).

    ``step`` is called with the number of writes done after each one (a test
    hook: it may stop the run to simulate a crash).
    """
    if not directories.rule_recorded or not directories.rewritable:
        raise ConfigurationError(
            f"{directories!r} does not keep the store's directory size rule: "
            "run rewrite-directories against the store's own directory service (not a daemon, cache or memory)"
        )
    source = directories.size_rule
    report = RewriteReport(source, target, dry_run)
    # Even a store that records the target already gets the whole pass: a run toward the other rule
    # that was interrupted leaves references to trees of that rule, which this converts back.
    rewriter = _Rewriter(directories, target, report, step)
    switched: dict[B3Digest, DirectoryNode] = {}
    """Old root digest -> its tree under the target rule, for the references met later."""
    by_nar: dict[bytes, DirectoryNode] = {}
    """A PathInfo's NarHash -> its root under the target rule (what a NAR index entry of it must name)."""
    if pathinfos is not None:
        async for info in pathinfos.list():
            if not isinstance(info.node, DirectoryNode):
                continue
            new = await rewriter.convert(info.node, str(info.store_path))
            by_nar[info.nar_sha256] = new or info.node
            if new is not None:
                switched[info.node.digest] = new
                if not dry_run:
                    await pathinfos.put(info.replace(node=new))
                    rewriter.stepped()
    if pins is not None:
        for pin in await pins.list():
            new = switched.get(pin.digest)
            if new is not None:
                new = rewriter.converted_before(new)
            else:
                if not await _is_directory_root(directories, pin.digest):
                    continue  # a blob (or nothing): blobs do not change
                new = await rewriter.convert(pin.digest, f"pin {pin.name}")
            if new is not None and not dry_run:
                await pins.pin(pin.name, new.digest)
                rewriter.stepped()
    if nar_index is not None:
        async for nar_sha256, node in nar_index.nodes():
            if not isinstance(node, DirectoryNode):
                continue
            new = switched.get(node.digest)
            if new is not None:
                new = rewriter.converted_before(new)
            else:
                # The PathInfo of the same NAR names the tree to use: after an interrupted run, `gc` may have
                # freed the old tree the index still names (the index is no GC root; its PathInfo was switched).
                known = by_nar.get(nar_sha256)
                if known is not None and known.digest != node.digest:
                    new = rewriter.converted_before(known)
                else:
                    new = await rewriter.convert(node, f"NAR index entry {nar_sha256.hex()}")
            if new is not None and not dry_run:
                await nar_index.replace_node(nar_sha256, new)
                rewriter.stepped()
    if not dry_run and not report.missing:  # a root left unconverted keeps the store from changing its rule
        await directories.record_size_rule(target)
        report.recorded = True
    return report


async def _is_directory_root(directories: DirectoryService, digest: B3Digest) -> bool:
    """Whether ``digest`` is a stored directory (object stores: a closure root), read under either rule."""
    for rule in (directories.size_rule, directories.size_rule.other):
        with contextlib.suppress(StorageError), _following(directories, rule):
            async for _ in directories.get_recursive(digest):
                return True
    return False
