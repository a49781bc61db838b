"""The data model's value classes (nixcas._record.Record): the behaviour their dataclasses had."""

from __future__ import annotations

import copy
import pickle

import pytest

from nixcas._record import Record
from nixcas.castore.digest import B3Digest
from nixcas.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from nixcas.errors import NixbaseError, PathInfoError, StorePathError, ValidationError
from nixcas.store.hashes import CAHash, CAKind, HashAlgo, NixHash
from nixcas.store.pathinfo.model import PathInfo, Signature
from nixcas.store.store_path import StorePath

D1 = B3Digest(bytes(range(32)))
D2 = B3Digest(bytes(range(1, 33)))
SP = StorePath(bytes(20), "hello")
OTHER = StorePath(bytes([1]) * 20, "dep")
PLAIN_D1: B3Digest = bytes(D1)  # type: ignore[assignment]  # converted by the constructor
ARRAY_20: bytes = bytearray(20)  # type: ignore[assignment]  # converted by the constructor
SHORT: B3Digest = bytes(31)  # type: ignore[assignment]  # refused by the constructor


def info(**changes: object) -> PathInfo:
    base = PathInfo(SP, DirectoryNode(D1, 3), [OTHER], 120, bytes(32), [Signature("k", bytes(64))])
    return base.replace(**changes)


VALUES = [
    (FileNode(D1, 5, executable=True), FileNode(D1, 5, True), FileNode(D1, 5)),
    (DirectoryNode(D1, 5), DirectoryNode(PLAIN_D1, 5), DirectoryNode(D2, 5)),
    (SymlinkNode(b"t"), SymlinkNode(b"t"), SymlinkNode(b"u")),
    (SP, StorePath.from_basename(SP.basename), OTHER),
    (NixHash(HashAlgo.SHA1, bytes(20)), NixHash("sha1", ARRAY_20), NixHash(HashAlgo.SHA1, bytes([1]) * 20)),
    (
        CAHash.flat(HashAlgo.SHA1, bytes(20)),
        CAHash(CAKind.FLAT, NixHash("sha1", bytes(20))),
        CAHash.nar(HashAlgo.SHA1, bytes(20)),
    ),
    (Signature("k", bytes(64)), Signature("k", bytes(64)), Signature("j", bytes(64))),
    (info(), info(references=(OTHER,)), info(nar_size=121)),
]


@pytest.mark.parametrize(("value", "same", "different"), VALUES, ids=lambda v: type(v).__name__)
def test_equal_by_class_and_fields_and_hashed_alike(value: Record, same: Record, different: Record) -> None:
    assert value == same and hash(value) == hash(same)
    assert value != different
    assert len({value, same, different}) == 2
    assert value != (*(getattr(value, name) for name in type(value).__match_args__),)  # not a tuple


def test_another_class_with_the_same_fields_is_not_equal() -> None:
    assert DirectoryNode(D1, 5) != FileNode(D1, 5)
    assert FileNode(D1, 5) != DirectoryNode(D1, 5)


@pytest.mark.parametrize(("value", "same", "different"), VALUES, ids=lambda v: type(v).__name__)
def test_immutable(value: Record, same: Record, different: Record) -> None:
    name = type(value).__match_args__[0]
    with pytest.raises(AttributeError, match="immutable"):
        setattr(value, name, getattr(different, name))
    with pytest.raises(AttributeError, match="immutable"):
        delattr(value, name)
    assert value == same


@pytest.mark.parametrize(("value", "same", "different"), VALUES, ids=lambda v: type(v).__name__)
def test_pickled_and_copied_values_are_equal(value: Record, same: Record, different: Record) -> None:
    assert pickle.loads(pickle.dumps(value)) == value  # noqa: S301 (our own bytes)
    assert copy.deepcopy(value) == value and copy.copy(value) == value


def test_repr_names_the_fields() -> None:
    assert repr(SymlinkNode(b"t")) == "SymlinkNode(target=b't')"
    assert repr(FileNode(D1, 5)) == f"FileNode(digest={D1!r}, size=5, executable=False)"


def test_positional_class_patterns() -> None:
    match FileNode(D1, 5, True):
        case FileNode(digest, size, executable):
            assert (digest, size, executable) == (D1, 5, True)
        case _:
            pytest.fail("no match")
    match info():
        case PathInfo(store_path, DirectoryNode(_, size)):
            assert (store_path, size) == (SP, 3)
        case _:
            pytest.fail("no match")


def test_replace_builds_a_checked_value() -> None:
    assert info().replace(nar_size=7).nar_size == 7
    assert FileNode(D1, 5).replace(executable=True) == FileNode(D1, 5, True)
    with pytest.raises(TypeError, match="no field 'size'"):
        info().replace(size=7)
    with pytest.raises(PathInfoError, match="NAR sha256 has 31 bytes"):
        info().replace(nar_sha256=bytes(31))
    with pytest.raises(ValidationError):
        SymlinkNode(b"t").replace(target=b"")


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: FileNode(D1, -1), ValidationError),
        (lambda: FileNode(D1, 2**64), ValidationError),
        (lambda: DirectoryNode(SHORT, 0), ValidationError),
        (lambda: SymlinkNode(b"a\0b"), ValidationError),
        (lambda: StorePath(bytes(19), "x"), StorePathError),
        (lambda: StorePath(bytes(20), "a/b"), StorePathError),
        (lambda: NixHash(HashAlgo.SHA256, bytes(20)), NixbaseError),
        (lambda: CAHash(CAKind.TEXT, NixHash(HashAlgo.SHA1, bytes(20))), NixbaseError),
        (lambda: Signature("a b", bytes(64)), PathInfoError),
        (lambda: info(references=["/nix/store/x"]), PathInfoError),
    ],
)
def test_constructors_check_their_values(build: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        build()  # type: ignore[operator]


def test_path_info_keeps_sequences_as_tuples_and_its_cached_encoding() -> None:
    value = info(references=[OTHER], signatures=[])
    assert value.references == (OTHER,) and value.signatures == ()
    assert value.encode() is value.encode()
    assert PathInfo.decode(value.encode()) == value
