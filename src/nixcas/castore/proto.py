"""The one place where castore domain types meet their protobuf messages.

Conversions *to* protobuf cannot fail (domain values are valid by
construction); conversions *from* protobuf validate and raise
:class:`~nixcas.errors.ValidationError` subclasses with the offending name.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from nixcas._proto.tvix.castore.protos import castore_pb2 as pb
from nixcas.castore.digest import DIGEST_LEN, B3Digest
from nixcas.castore.nodes import (
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
    validate_name,
)
from nixcas.errors import DirectoryError, InvalidSymlinkTargetError, ValidationError

__all__ = ["decode_node", "encode_node", "node_from_proto", "node_to_proto", "pb"]


def _entry_digest(name: bytes, digest: bytes) -> B3Digest:
    if len(digest) != DIGEST_LEN:
        raise DirectoryError(f"invalid node {name[:300]!r}: invalid digest length {len(digest)}")
    return B3Digest(digest)


def directory_entry_from_proto(msg: pb.DirectoryNode) -> tuple[bytes, DirectoryNode]:
    """Validate one ``DirectoryNode`` message (digest, then name)."""
    node = DirectoryNode(_entry_digest(msg.name, msg.digest), msg.size)
    return validate_name(msg.name), node


def file_entry_from_proto(msg: pb.FileNode) -> tuple[bytes, FileNode]:
    """Validate one ``FileNode`` message (digest, then name)."""
    node = FileNode(_entry_digest(msg.name, msg.digest), msg.size, msg.executable)
    return validate_name(msg.name), node


def symlink_entry_from_proto(msg: pb.SymlinkNode) -> tuple[bytes, SymlinkNode]:
    """Validate one ``SymlinkNode`` message (target, then name)."""
    try:
        node = SymlinkNode(msg.target)
    except InvalidSymlinkTargetError as e:
        raise DirectoryError(f"invalid node {msg.name[:300]!r}: {e}") from None
    return validate_name(msg.name), node


def node_to_proto(name: bytes, node: Node) -> pb.Node:
    """A named node as a ``Node`` message (``name`` may be empty: anonymous)."""
    if isinstance(node, DirectoryNode):
        return pb.Node(directory=pb.DirectoryNode(name=name, digest=node.digest, size=node.size))
    if isinstance(node, FileNode):
        return pb.Node(file=pb.FileNode(name=name, digest=node.digest, size=node.size, executable=node.executable))
    return pb.Node(symlink=pb.SymlinkNode(name=name, target=node.target))


def node_from_proto(msg: pb.Node, *, anonymous: bool = False) -> tuple[bytes, Node]:
    """Validate a ``Node`` message; with ``anonymous`` the name must be empty."""
    kind = msg.WhichOneof("node")
    if kind is None:
        raise ValidationError("invalid node: no node set")
    name: bytes
    node: Node
    if kind == "directory":
        d = msg.directory
        name = d.name
        node = DirectoryNode(_entry_digest(name, d.digest), d.size)
    elif kind == "file":
        name, f = msg.file.name, msg.file
        node = FileNode(_entry_digest(name, f.digest), f.size, f.executable)
    else:
        name = msg.symlink.name
        try:
            node = SymlinkNode(msg.symlink.target)
        except InvalidSymlinkTargetError as e:
            raise ValidationError(f"invalid node {name[:300]!r}: {e}") from None
    if anonymous:
        if name:
            raise ValidationError(f"name {name[:300]!r} in anonymous node")
    else:
        validate_name(name)
    return name, node


def encode_node(name: bytes, node: Node) -> bytes:
    """Canonical bytes of a ``Node`` message."""
    return node_to_proto(name, node).SerializeToString(deterministic=True)


def decode_node(data: bytes, *, anonymous: bool = False) -> tuple[bytes, Node]:
    """Parse and validate a serialized ``Node`` message."""
    msg = pb.Node()
    try:
        msg.ParseFromString(data)
    except DecodeError as e:
        raise ValidationError(f"cannot decode Node message: {e}") from None
    return node_from_proto(msg, anonymous=anonymous)
