"""PathInfo: what the store knows about one store path, and its protobuf form.

A PathInfo ties a store path to a castore root node and carries the NAR
metadata Nix needs (size, SHA-256, references, signatures, deriver, CA).
:meth:`PathInfo.from_proto` validates a ``tvix.store.v1.PathInfo`` message in
the order of reference §1.8, so the first problem reported is the one a
tvix daemon would report.  Protobuf is loaded by the first encode, or by a
decode of bytes :mod:`nixcas.store.pathinfo.canonical` does not read.
"""

from __future__ import annotations

import base64
import binascii
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property

from nixcas._record import Record
from nixcas.castore.nodes import Node
from nixcas.errors import NixbaseError, PathInfoError, StorageError, StorePathError, ValidationError
from nixcas.store import nixbase32
from nixcas.store.hashes import CAHash, HashAlgo, NixHash
from nixcas.store.store_path import STORE_DIR, StorePath

TYPE_CHECKING = False  # not typing's: `path-info` loads nothing else of it
if TYPE_CHECKING:  # protobuf is loaded by the first encode, or a decode of non-canonical bytes
    from typing import Final

    from nixcas._proto.tvix.store.protos import pathinfo_pb2 as pb

__all__ = ["PathInfo", "Signature", "check_path_info_fields", "split_named_base64", "verified_record"]

_set = object.__setattr__
SIGNATURE_SIZE: Final = 64
KEY_NAME = re.compile(r"[A-Za-z0-9.\-]+")
"""What a key (and signature) name may consist of."""


def split_named_base64(text: str, what: str, error: type[ValidationError] = PathInfoError) -> tuple[str, bytes]:
    """``name:base64`` (signatures, keys) → (name, bytes); the name is A-Z a-z 0-9 . - (Nix's rule).

    Messages show the name, never the base64 part (it may be a secret key).
    """
    name, sep, b64 = text.strip().partition(":")
    if not sep or not KEY_NAME.fullmatch(name):
        raise error(f"invalid {what}: expected <name>:<base64> with a name of A-Z a-z 0-9 . -")
    try:
        return name, base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):  # ValueError: a non-ASCII character
        raise error(f"invalid {what} {name!r}: bad base64") from None


class Signature(Record):
    """A narinfo signature: key name and 64 ed25519 signature bytes; text form ``name:base64``."""

    __slots__ = ("data", "name")
    __match_args__ = ("name", "data")
    name: str
    data: bytes

    def __init__(self, name: str, data: bytes) -> None:
        # Checked here, where every signature is made (gRPC, narinfo text, nix path-info JSON, signing):
        # the name is written into narinfo lines, so a newline in it would add lines of its own.
        if not isinstance(name, str) or not KEY_NAME.fullmatch(name):
            shown = name[:100] if isinstance(name, str) else name
            raise PathInfoError(f"invalid signature name {shown!r}: a key name is A-Z a-z 0-9 . - only")
        if not isinstance(data, bytes) or len(data) != SIGNATURE_SIZE:
            size = len(data) if isinstance(data, bytes | bytearray) else type(data).__name__
            raise PathInfoError(f"signature {name!r}: {size} bytes, want {SIGNATURE_SIZE}")
        _set(self, "name", name)
        _set(self, "data", data)

    @classmethod
    def parse(cls, text: str) -> Signature:
        name, data = split_named_base64(text, "signature")
        return cls(name, data)

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.data).decode()}"


def check_path_info_fields(
    store_path: object,
    references: tuple[object, ...],
    nar_size: object,
    nar_sha256: object,
    signatures: tuple[object, ...],
    deriver: object,
    ca: object,
) -> None:
    """The one check of the fields a PathInfo and a narinfo share, made by both constructors.

    Every entry point (gRPC ``Put`` under either name, ``PUT /<hash>.narinfo``, a ``nix+http``
    upstream, ``copy``, ``import``, records read back from a backend) builds one of the two,
    so none can store or serve a field that is not what its narinfo line says it is: store
    paths, references and the deriver are :class:`StorePath` (whose names are checked), the
    signatures :class:`Signature` (key name and 64 bytes checked), the CA a :class:`CAHash`,
    the NAR hash 32 bytes and the NAR size a 64-bit count.
    """
    if not isinstance(store_path, StorePath):
        raise PathInfoError(f"invalid store path: a {type(store_path).__name__}, not a StorePath")
    for ref in references:
        if not isinstance(ref, StorePath):
            raise PathInfoError(f"{store_path}: invalid reference: a {type(ref).__name__}, not a StorePath")
    if not isinstance(nar_sha256, bytes) or len(nar_sha256) != 32:
        size = len(nar_sha256) if isinstance(nar_sha256, bytes | bytearray) else type(nar_sha256).__name__
        raise PathInfoError(f"{store_path}: NAR sha256 has {size} bytes, want 32")
    if not isinstance(nar_size, int) or isinstance(nar_size, bool) or not 0 <= nar_size < 1 << 64:
        raise PathInfoError(f"{store_path}: NAR size {str(nar_size)[:40]} out of range")
    for sig in signatures:
        if not isinstance(sig, Signature):
            raise PathInfoError(f"{store_path}: invalid signature: a {type(sig).__name__}, not a Signature")
    if deriver is not None and not isinstance(deriver, StorePath):
        raise PathInfoError(f"{store_path}: invalid deriver: a {type(deriver).__name__}, not a StorePath")
    if ca is not None and not isinstance(ca, CAHash):
        raise PathInfoError(f"{store_path}: invalid content address: a {type(ca).__name__}, not a CAHash")


class PathInfo(Record):
    """A store path's root node and NAR metadata.  Keyed by ``store_path.digest``."""

    __match_args__ = ("store_path", "node", "references", "nar_size", "nar_sha256", "signatures", "deriver", "ca")
    store_path: StorePath
    node: Node
    references: tuple[StorePath, ...]
    nar_size: int
    nar_sha256: bytes
    signatures: tuple[Signature, ...]
    deriver: StorePath | None
    """The deriver, its name without the ``.drv`` suffix (as tvix stores it)."""
    ca: CAHash | None

    def __init__(
        self,
        store_path: StorePath,
        node: Node,
        references: Iterable[StorePath],
        nar_size: int,
        nar_sha256: bytes,
        signatures: Iterable[Signature] = (),
        deriver: StorePath | None = None,
        ca: CAHash | None = None,
    ) -> None:
        references = tuple(references)
        signatures = tuple(signatures)
        check_path_info_fields(store_path, references, nar_size, nar_sha256, signatures, deriver, ca)
        fields = self.__dict__
        fields["store_path"] = store_path
        fields["node"] = node
        fields["references"] = references
        fields["nar_size"] = nar_size
        fields["nar_sha256"] = nar_sha256
        fields["signatures"] = signatures
        fields["deriver"] = deriver
        fields["ca"] = ca

    @property
    def digest(self) -> bytes:
        """The 20-byte key: the store path's digest."""
        return self.store_path.digest

    @property
    def nar_hash(self) -> NixHash:
        return NixHash(HashAlgo.SHA256, self.nar_sha256)

    def with_signatures(self, signatures: Iterable[Signature]) -> PathInfo:
        """A copy with ``signatures`` appended (duplicates dropped)."""
        merged = list(self.signatures)
        for sig in signatures:
            if sig not in merged:
                merged.append(sig)
        return PathInfo(
            self.store_path,
            self.node,
            self.references,
            self.nar_size,
            self.nar_sha256,
            tuple(merged),
            self.deriver,
            self.ca,
        )

    # -- protobuf -----------------------------------------------------------------

    def to_proto(self) -> pb.PathInfo:
        from nixcas._proto.tvix.store.protos import pathinfo_pb2 as pb
        from nixcas.castore.proto import node_to_proto

        msg = pb.PathInfo(node=node_to_proto(self.store_path.basename.encode(), self.node))
        msg.references.extend(ref.digest for ref in self.references)
        info = msg.narinfo
        info.nar_size = self.nar_size
        info.nar_sha256 = self.nar_sha256
        for sig in self.signatures:
            info.signatures.add(name=sig.name, data=sig.data)
        info.reference_names.extend(ref.basename for ref in self.references)
        if self.deriver is not None:
            info.deriver.name = self.deriver.name
            info.deriver.digest = self.deriver.digest
        if self.ca is not None:
            info.ca.type = self.ca.proto_type  # type: ignore[assignment]
            info.ca.digest = self.ca.hash.digest
        return msg

    def encode(self) -> bytes:
        """The serialized ``PathInfo`` message (deterministic)."""
        return self._encoded

    @cached_property
    def _encoded(self) -> bytes:
        from nixcas.store.pathinfo.canonical import encode_canonical

        return encode_canonical(self)

    @classmethod
    def decode(cls, data: bytes) -> PathInfo:
        """Parse and validate a serialized ``PathInfo`` message.

        Until protobuf is loaded, canonical bytes (every record nixcas writes)
        are read by :func:`~nixcas.store.pathinfo.canonical.decode_canonical`,
        so reading a record does not load protobuf; other bytes, and all once
        protobuf is loaded, go through protobuf.  Both validate with
        :meth:`from_parts`, so both give the same PathInfo or the same error.
        """
        if "google.protobuf.message" not in sys.modules:
            from nixcas.store.pathinfo.canonical import decode_canonical

            info = decode_canonical(bytes(data))
            if info is not None:
                return info
        from google.protobuf.message import DecodeError

        from nixcas._proto.tvix.store.protos import pathinfo_pb2 as pb

        msg = pb.PathInfo()
        try:
            msg.ParseFromString(data)
        except DecodeError as e:
            raise PathInfoError(f"cannot decode PathInfo message: {e}") from None
        return cls.from_proto(msg)

    @classmethod
    def from_proto(cls, msg: pb.PathInfo) -> PathInfo:
        """Validate a ``PathInfo`` message (checks in the order of reference §1.8)."""
        if not msg.HasField("narinfo"):
            raise PathInfoError("invalid path info: narinfo field missing")
        info = msg.narinfo

        def root() -> tuple[bytes, Node]:
            from nixcas.castore.proto import node_from_proto

            return node_from_proto(msg.node)

        return cls.from_parts(
            references=list(msg.references),
            reference_names=list(info.reference_names),
            root=root if msg.HasField("node") else None,
            nar_size=info.nar_size,
            nar_sha256=info.nar_sha256,
            signatures=[(sig.name, sig.data) for sig in info.signatures],
            deriver=(info.deriver.name, info.deriver.digest) if info.HasField("deriver") else None,
            ca=(info.ca.type, info.ca.digest) if info.HasField("ca") else None,
        )

    @classmethod
    def from_parts(
        cls,
        *,
        references: Sequence[bytes],
        reference_names: Sequence[str],
        root: Callable[[], tuple[bytes, Node]] | None,
        nar_size: int,
        nar_sha256: bytes,
        signatures: Sequence[tuple[str, bytes]],
        deriver: tuple[str, bytes] | None,
        ca: tuple[int, bytes] | None,
    ) -> PathInfo:
        """Validate the fields of a decoded ``PathInfo`` message (present ``narinfo``) in the order of §1.8.

        ``root`` gives the root node's name and node (raising
        :class:`~nixcas.errors.ValidationError` for an invalid one), ``None``
        if the message has none; ``deriver`` is (name, digest), ``ca`` (type, digest).
        """
        for i, ref in enumerate(references):
            if len(ref) != 20:
                raise PathInfoError(f"invalid path info: reference {i} has {len(ref)} bytes, want 20")
        if len(reference_names) != len(references):
            raise PathInfoError(
                f"invalid path info: {len(references)} references but {len(reference_names)} reference names"
            )
        store_paths: list[StorePath] = []
        for i, (ref_name, ref_digest) in enumerate(zip(reference_names, references, strict=True)):
            try:
                reference = StorePath.from_basename(ref_name)
            except StorePathError as e:
                raise PathInfoError(f"invalid path info: reference name {i} {ref_name[:100]!r}: {e}") from None
            if reference.digest != ref_digest:
                raise PathInfoError(
                    f"invalid path info: reference name {i} {ref_name!r} does not match its digest "
                    f"{nixbase32.encode(ref_digest)}"
                )
            store_paths.append(reference)
        if root is None:
            raise PathInfoError("invalid path info: no root node")
        try:
            name, node = root()
        except ValidationError as e:
            raise PathInfoError(f"invalid path info: invalid root node: {e}") from None
        try:
            store_path = StorePath.from_basename(name)
        except StorePathError as e:
            raise PathInfoError(f"invalid path info: root node name {name[:100]!r} is no store path: {e}") from None
        if len(nar_sha256) != 32:
            raise PathInfoError(f"invalid path info: nar_sha256 has {len(nar_sha256)} bytes, want 32")
        derived_from: StorePath | None = None
        if deriver is not None:
            try:
                derived_from = StorePath(deriver[1], deriver[0])
            except StorePathError as e:
                raise PathInfoError(f"invalid path info: invalid deriver: {e}") from None
        checked: list[Signature] = []
        for i, (sig_name, sig_data) in enumerate(signatures):
            if len(sig_data) != SIGNATURE_SIZE:
                raise PathInfoError(
                    f"invalid path info: signature {i} has {len(sig_data)} bytes, want {SIGNATURE_SIZE}"
                )
            checked.append(Signature(sig_name, sig_data))
        content_address: CAHash | None = None
        if ca is not None:
            try:
                content_address = CAHash.from_proto(*ca)
            except NixbaseError as e:
                raise PathInfoError(f"invalid path info: CA: {e}") from None
        return cls(
            store_path, node, tuple(store_paths), nar_size, nar_sha256, tuple(checked), derived_from, content_address
        )

    # -- display ------------------------------------------------------------------

    def to_json(self) -> dict[str, object]:
        """The ``path-info --json`` form (Nix's field names where Nix has one)."""
        from nixcas.castore.nodes import DirectoryNode, FileNode

        node: dict[str, object]
        if isinstance(self.node, DirectoryNode):
            node = {"type": "directory", "digest": self.node.digest.hex(), "size": self.node.size}
        elif isinstance(self.node, FileNode):
            node = {
                "type": "file",
                "digest": self.node.digest.hex(),
                "size": self.node.size,
                "executable": self.node.executable,
            }
        else:
            node = {"type": "symlink", "target": self.node.target.decode(errors="surrogateescape")}
        return {
            "path": str(self.store_path),
            "narHash": self.nar_hash.to_sri(),
            "narSize": self.nar_size,
            "references": sorted(str(r) for r in self.references),
            "ca": None if self.ca is None else str(self.ca),
            "signatures": [str(s) for s in self.signatures],
            "deriver": None if self.deriver is None else f"{STORE_DIR}/{self.deriver.basename}.drv",
            "rootNode": node,
        }


def verified_record(digest: bytes, raw: bytes, where: str) -> PathInfo:
    """A stored record read by store path ``digest``: decoded, validated, and the record of that very path.

    What every read of a stored PathInfo goes through (the path info services'
    verify-on-read, and the command line's read-only fast path); a bad record is
    a :class:`~nixcas.errors.StorageError` naming ``where`` it was read.
    """
    try:
        info = PathInfo.decode(raw)
    except PathInfoError as e:
        raise StorageError(f"{where}: stored path info for {nixbase32.encode(digest)} is invalid: {e}") from None
    if info.digest != digest:
        raise StorageError(
            f"{where}: stored path info for {nixbase32.encode(digest)} describes {info.store_path} instead"
        )
    return info
