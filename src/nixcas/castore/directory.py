"""``Directory``: one level of the Merkle DAG, its canonical encoding and digest.

Size rules.  A Directory's encoding records, for each sub-directory, the
size of that sub-directory; what a Directory's own size is depends on the
:class:`~nixcas.castore.sizerule.SizeRule` of the store it lives in (tvix and
snix up to 2025: ``2 * #entries + Σ child sizes``; snix 2026:
``#files + #symlinks + 2 * #directories + Σ child sizes``).  So a Directory
has no single size: :meth:`Directory.size_under` and :meth:`Directory.node`
take the rule, and whoever checks a recorded size passes the store's rule.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping

import blake3

from nixcas.castore.digest import B3Digest
from nixcas.castore.nodes import (
    U64_MAX,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
    validate_name,
)
from nixcas.castore.sizerule import SizeRule
from nixcas.errors import ChecksumMismatch, DirectoryError, StorageError

TYPE_CHECKING = False  # not typing's: `castore ls` loads nothing else of it
if TYPE_CHECKING:  # protobuf is loaded by the first encode or decode, not by `import`
    from nixcas.castore.proto import pb

__all__ = ["Directory", "check_stored", "decode_stored"]


class Directory:
    """An immutable, validated mapping from name to :data:`Node`, sorted by name bytes."""

    __slots__ = ("_child_sizes", "_digest", "_directories", "_encoded", "_entries", "_index")

    _entries: tuple[tuple[bytes, Node], ...]

    def __init__(
        self, entries: Mapping[bytes, Node] | Iterable[tuple[bytes, Node]] = (), *, _names_checked: bool = False
    ) -> None:
        items = entries.items() if isinstance(entries, Mapping) else entries
        index: dict[bytes, Node] = {}
        child_sizes = 0
        directories = 0
        for name, node in items:
            if not _names_checked:
                validate_name(name)
            if name in index:
                raise DirectoryError(f"duplicate name {name[:300]!r}")
            if isinstance(node, DirectoryNode):
                child_sizes += node.size
                directories += 1
            elif not isinstance(node, (FileNode, SymlinkNode)):
                raise TypeError(f"not a node: {node!r}")
            index[name] = node
        # the smaller of the two sizes (snix's) must fit; size_under refuses a rule whose size does not
        if len(index) + directories + child_sizes > U64_MAX:
            raise DirectoryError("directory size overflows 64 bits")
        self._entries = tuple(sorted(index.items()))
        self._index = index
        self._child_sizes = child_sizes
        self._directories = directories
        self._digest: B3Digest | None = None
        self._encoded: bytes | None = None

    # -- mapping-like access -------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[bytes, Node]]:
        return iter(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def get(self, name: bytes) -> Node | None:
        """The node called ``name``, or ``None``."""
        return self._index.get(name)

    @property
    def entries(self) -> tuple[tuple[bytes, Node], ...]:
        """All ``(name, node)`` pairs, sorted by name across all kinds (NAR order)."""
        return self._entries

    def directories(self) -> Iterator[tuple[bytes, DirectoryNode]]:
        """The sub-directory entries, sorted by name."""
        for name, node in self._entries:
            if isinstance(node, DirectoryNode):
                yield name, node

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Directory) and self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"<Directory {self.digest.hex()} entries={len(self)}>"

    # -- derived values ------------------------------------------------------

    def size_under(self, rule: SizeRule) -> int:
        """The size a parent records for this Directory in a store following ``rule``."""
        size = rule.size(len(self._entries), self._directories, self._child_sizes)
        if size > U64_MAX:
            raise DirectoryError(f"directory size overflows 64 bits under the {rule} rule")
        return size

    def node(self, rule: SizeRule) -> DirectoryNode:
        """A :class:`DirectoryNode` pointing at this Directory, sized by ``rule``."""
        return DirectoryNode(self.digest, self.size_under(rule))

    def size_mismatch(self, rule: SizeRule, recorded: int, where: str) -> str | None:
        """``None`` if ``recorded`` (what a parent records for this Directory) is its size under ``rule``.

        Else the one-line complaint, starting with ``where`` (the parent and
        entry name): it names the rule, and says so when ``recorded`` is the
        size under the other rule (a tree made by a peer of the other rule).
        """
        expected = self.size_under(rule)
        if recorded == expected:
            return None
        hint = ""
        if recorded == self.size_under(rule.other):
            hint = f" (its size under the {rule.other} rule: the tree follows the {rule.other} rule)"
        return (
            f"{where} has wrong size {recorded} for directory {self.digest.hex()}, "
            f"which has size {expected} under the {rule} directory size rule{hint}"
        )

    def to_proto(self) -> pb.Directory:
        """The ``Directory`` message, each list sorted by name."""
        from nixcas.castore.proto import pb

        msg = pb.Directory()
        for name, node in self._entries:
            if isinstance(node, DirectoryNode):
                msg.directories.add(name=name, digest=node.digest, size=node.size)
            elif isinstance(node, FileNode):
                msg.files.add(name=name, digest=node.digest, size=node.size, executable=node.executable)
            else:
                msg.symlinks.add(name=name, target=node.target)
        return msg

    def encode(self) -> bytes:
        """The canonical protobuf encoding (what the digest is computed over), written without protobuf."""
        if self._encoded is None:
            from nixcas.castore.canonical import encode_canonical

            self._encoded = encode_canonical(self._entries)
        return self._encoded

    @property
    def digest(self) -> B3Digest:
        """BLAKE3 of :meth:`encode`."""
        if self._digest is None:
            self._digest = B3Digest(blake3.blake3(self.encode()).digest())
        return self._digest

    # -- parsing -------------------------------------------------------------

    @classmethod
    def from_proto(cls, msg: pb.Directory) -> Directory:
        """Validate a ``Directory`` message.

        Per list, names must be strictly increasing; every entry must be valid;
        names must be unique across the three lists; the size must fit 64 bits.
        """
        from nixcas.castore.proto import directory_entry_from_proto, file_entry_from_proto, symlink_entry_from_proto

        entries: list[tuple[bytes, Node]] = []
        for kind, items, convert in (
            ("directories", msg.directories, directory_entry_from_proto),
            ("files", msg.files, file_entry_from_proto),
            ("symlinks", msg.symlinks, symlink_entry_from_proto),
        ):
            prev: bytes | None = None
            for item in items:
                name = item.name
                if prev is not None:
                    if name < prev:
                        raise DirectoryError(f"{kind}: {name[:300]!r} is not sorted after {prev[:300]!r}")
                    if name == prev:
                        raise DirectoryError(f"duplicate name {name[:300]!r}")
                prev = name
                entries.append(convert(item))  # type: ignore[arg-type]
        return cls(entries, _names_checked=True)  # each converter validated its name

    @classmethod
    def decode(cls, data: bytes, *, digest: B3Digest | None = None) -> Directory:
        """Parse and validate serialized ``Directory`` bytes.

        ``digest``: the caller has checked that it is the BLAKE3 of ``data``
        (a stored value read back), so ``data`` is the encoding that digest
        names and need not be computed again.

        Until protobuf is loaded, canonical bytes (every stored Directory) are
        read by :func:`~nixcas.castore.canonical.decode_canonical`, so a command
        that only lists directories never loads it; other bytes, and all bytes
        once protobuf is loaded (its decoder is faster per entry), go through
        protobuf.  Both give the same Directory.
        """
        directory = None
        if "google.protobuf.message" not in sys.modules:
            from nixcas.castore.canonical import decode_canonical

            raw = bytes(data)  # names and digests are sliced out of it: bytes, never a view
            entries = decode_canonical(raw)
            if entries is not None:
                directory = cls(entries, _names_checked=True)
                directory._encoded = raw  # accepted bytes are their own canonical encoding
        if directory is None:
            from google.protobuf.message import DecodeError

            from nixcas.castore.proto import pb

            msg = pb.Directory()
            try:
                msg.ParseFromString(data)
            except DecodeError as e:
                raise DirectoryError(f"cannot decode Directory message: {e}") from None
            directory = cls.from_proto(msg)
        if digest is not None:
            directory._encoded = bytes(data)
            directory._digest = digest
        return directory


def check_stored(digest: B3Digest, raw: bytes) -> None:
    """Stored Directory bytes hash to the digest they were read by; :class:`ChecksumMismatch` otherwise."""
    got = blake3.blake3(raw).digest()
    if got != digest:
        raise ChecksumMismatch(f"directory {digest.hex()}", digest.hex(), got.hex())


def decode_stored(digest: B3Digest, raw: bytes) -> Directory:
    """Stored Directory bytes read by ``digest``: hash-checked, then decoded and validated.

    What every read of a stored Directory goes through (the directory services'
    verify-on-read, and the command line's read-only fast path).
    """
    check_stored(digest, raw)
    try:
        return Directory.decode(raw, digest=digest)
    except ValueError as e:
        raise StorageError(f"directory {digest.hex()} is stored in an invalid form: {e}") from None
