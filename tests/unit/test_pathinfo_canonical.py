"""decode_canonical: canonical PathInfo bytes without protobuf, the same answers as protobuf's path."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from google.protobuf.message import DecodeError

from nixcas._proto.tvix.store.protos import pathinfo_pb2 as pb
from nixcas.castore.digest import B3Digest
from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from nixcas.errors import PathInfoError, ValidationError
from nixcas.store.hashes import CAHash, CAKind, HashAlgo, NixHash
from nixcas.store.pathinfo.canonical import decode_canonical, encode_canonical
from nixcas.store.pathinfo.model import PathInfo, Signature
from nixcas.store.store_path import StorePath
from nixcas.testing.daemon import clean_env

CA_KINDS = [
    (CAKind.NAR, HashAlgo.SHA256),
    (CAKind.NAR, HashAlgo.SHA1),
    (CAKind.NAR, HashAlgo.SHA512),
    (CAKind.NAR, HashAlgo.MD5),
    (CAKind.TEXT, HashAlgo.SHA256),
    (CAKind.FLAT, HashAlgo.SHA1),
    (CAKind.FLAT, HashAlgo.MD5),
    (CAKind.FLAT, HashAlgo.SHA256),
    (CAKind.FLAT, HashAlgo.SHA512),
]
"""Every NARInfo.CA type, NAR_SHA256 (0: left out of the encoding) first."""


def protobuf_decode(data: bytes) -> PathInfo | str:
    """What the protobuf path makes of ``data``: a PathInfo, or the error's text."""
    msg = pb.PathInfo()
    try:
        msg.ParseFromString(data)
        return PathInfo.from_proto(msg)
    except (DecodeError, ValidationError) as e:
        return f"{type(e).__name__}: {e}"


def canonical_decode(data: bytes) -> PathInfo | str | None:
    """What decode_canonical makes of ``data``: a PathInfo, the error's text, or ``None`` (protobuf's to read)."""
    try:
        return decode_canonical(data)
    except ValidationError as e:
        return f"{type(e).__name__}: {e}"


def random_store_path(rng: random.Random) -> StorePath:
    length = rng.choice([1, 5, 40, 90, 211])
    name = "".join(rng.choice("abcXYZ019+-_?=.") for _ in range(length))
    return StorePath(rng.randbytes(20), name)


def random_path_info(rng: random.Random) -> PathInfo:
    path = random_store_path(rng)
    nodes: list[Node] = [
        DirectoryNode(B3Digest(rng.randbytes(32)), rng.choice([0, 2, 300, 2**40])),
        FileNode(B3Digest(rng.randbytes(32)), rng.choice([0, 1, 127, 128, 2**63]), rng.random() < 0.5),
        SymlinkNode(bytes(rng.randrange(1, 256) for _ in range(rng.choice([1, 100, 200])))),
    ]
    references = tuple(random_store_path(rng) for _ in range(rng.randrange(4)))
    if rng.random() < 0.3:
        references += (path,)  # a self reference
    ca = None
    if rng.random() < 0.8:
        kind, algo = rng.choice(CA_KINDS)
        ca = CAHash(kind, NixHash(algo, rng.randbytes(algo.digest_size)))
    return PathInfo(
        store_path=path,
        node=rng.choice(nodes),
        references=references,
        nar_size=rng.choice([0, 1, 2**32, 2**64 - 1]),
        nar_sha256=rng.randbytes(32),
        signatures=tuple(Signature(f"key-{i}.example.org", rng.randbytes(64)) for i in range(rng.randrange(3))),
        deriver=random_store_path(rng) if rng.random() < 0.5 else None,
        ca=ca,
    )


def test_every_canonical_encoding_with_short_names_is_read() -> None:
    rng = random.Random(1)  # noqa: S311 - reproducible test data
    read = 0
    for _ in range(300):
        info = random_path_info(rng)
        data = info.encode()
        decoded = decode_canonical(data)
        if len(info.store_path.basename) >= 128:  # a root name of two-byte length: protobuf's path
            assert decoded is None or decoded == info
            continue
        assert decoded == info
        read += 1
    assert read > 100


def test_encoding_is_protobufs_deterministic_serialization() -> None:
    """PathInfo.encode writes without protobuf exactly what protobuf's deterministic serialization gives."""
    rng = random.Random(5)  # noqa: S311 - reproducible test data
    for _ in range(400):
        info = random_path_info(rng)
        assert encode_canonical(info) == info.to_proto().SerializeToString(deterministic=True)
    for kind, algo in CA_KINDS:
        info = random_path_info(rng)
        info = info.replace(ca=CAHash(kind, NixHash(algo, rng.randbytes(algo.digest_size))))
        assert info.encode() == info.to_proto().SerializeToString(deterministic=True)


def test_every_ca_type_is_read() -> None:
    for kind, algo in CA_KINDS:
        ca = CAHash(kind, NixHash(algo, bytes(range(algo.digest_size))))
        info = PathInfo(StorePath(bytes(20), "x"), FileNode(B3Digest(bytes(32)), 3), (), 5, bytes(32), ca=ca)
        assert decode_canonical(info.encode()) == info


def mutations(data: bytes, rng: random.Random) -> list[bytes]:
    out = [data[:i] for i in range(0, len(data), 3)]  # truncations
    for _ in range(80):
        i = rng.randrange(len(data) + 1)
        out.append(data[:i] + bytes([rng.randrange(256)]) + data[i:])  # a byte inserted
        j = rng.randrange(len(data))
        out.append(data[:j] + bytes([data[j] ^ (1 << rng.randrange(8))]) + data[j + 1 :])  # a bit flipped
    out.append(data + b"\x22\x00")  # unknown field 4
    out.append(data + b"\x12\x14" + bytes(20))  # references after narinfo
    return out


def test_any_bytes_read_are_protobufs_answer_and_their_own_encoding() -> None:
    """Whatever decode_canonical accepts, protobuf reads the same way (or refuses with the same error)."""
    rng = random.Random(2)  # noqa: S311 - reproducible test data
    read = refused = 0
    for _ in range(20):
        data = random_path_info(rng).encode()
        for mutated in mutations(data, rng):
            ours = canonical_decode(mutated)
            if ours is None:
                continue
            expected = protobuf_decode(mutated)
            assert ours == expected, mutated.hex()
            if isinstance(ours, PathInfo):
                read += 1
                assert ours.encode() == mutated
            else:
                refused += 1
    assert read > 0
    assert refused > 0


def field(tag: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([tag, len(body)]) + body


NAME = b"00000000000000000000000000000000-x"
NODE = field(0x0A, field(0x12, field(0x0A, NAME) + field(0x12, bytes(32)) + b"\x18\x05"))  # a file of 5 bytes
SHA = field(0x12, bytes(32))


@pytest.mark.parametrize(
    "data",
    [
        NODE + field(0x1A, b"\x08\x00" + SHA),  # nar_size 0 written out
        NODE + field(0x1A, b"\x08\x81\x00" + SHA),  # nar_size 1 in a two-byte varint
        NODE + field(0x1A, SHA + b"\x08\x01"),  # fields out of order
        NODE + field(0x1A, SHA + SHA),  # a singular field twice
        NODE + NODE + field(0x1A, SHA),  # the node twice (protobuf merges)
        NODE + field(0x1A, SHA + b"\x38\x01"),  # unknown field 7
        NODE + field(0x1A, SHA + field(0x22, b"\xff")),  # a reference name that is not UTF-8
        NODE + field(0x1A, SHA + field(0x32, b"\x08\x00" + SHA)),  # CA type 0 written out
        NODE + field(0x1A, SHA + field(0x32, b"\x08\x80\x80\x80\x80\x10" + SHA)),  # CA type past int32
        field(0x1A, SHA),  # no node
        NODE,  # no narinfo
        NODE + field(0x1A, SHA) + b"\x12",  # a tag without its value
        field(0x0A, b"") + field(0x1A, SHA),  # an empty node
    ],
)
def test_non_canonical_or_unusual_bytes_go_to_protobuf(data: bytes) -> None:
    assert canonical_decode(data) is None


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (
            NODE + field(0x12, bytes(20)) + field(0x1A, SHA + field(0x22, b"11111111111111111111111111111111-y")),
            "invalid path info: reference name 0",
        ),
        (NODE + field(0x1A, SHA + field(0x2A, field(0x0A, b"x"))), "invalid path info: invalid deriver"),
        (NODE + field(0x1A, field(0x12, bytes(31))), "invalid path info: nar_sha256 has 31 bytes"),
        (NODE + field(0x1A, SHA + field(0x1A, field(0x0A, b"k") + field(0x12, bytes(63)))), "signature 0 has 63"),
        (NODE + field(0x1A, SHA + field(0x32, b"\x08\x09" + SHA)), "unknown NARInfo.CA hash type 9"),
    ],
)
def test_invalid_canonical_record_is_the_same_error_either_way(data: bytes, error: str) -> None:
    """Canonical bytes of an invalid PathInfo fail with protobuf's path's error, checked in the same order."""
    fast = canonical_decode(data)
    assert isinstance(fast, str) and fast.startswith(f"{PathInfoError.__name__}: "), fast
    assert error in fast
    assert fast == protobuf_decode(data)


def test_path_info_decode_without_protobuf_loaded() -> None:
    """In a process without protobuf, PathInfo.decode reads canonical bytes alone and loads it for the rest."""
    rng = random.Random(3)  # noqa: S311 - reproducible test data
    info = random_path_info(rng)
    while len(info.store_path.basename) >= 128:
        info = random_path_info(rng)
    odd = NODE + field(0x1A, b"\x08\x00" + SHA)  # valid protobuf, not canonical
    expected = protobuf_decode(odd)
    assert isinstance(expected, PathInfo)
    code = f"""
import sys
from nixcas.store.pathinfo.model import PathInfo
i = PathInfo.decode({info.encode()!r})
print(i.store_path, i.nar_size, "google.protobuf.message" in sys.modules)
o = PathInfo.decode({odd!r})
print(o.store_path, o.nar_size, "google.protobuf.message" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=clean_env())
    assert out.stdout.split("\n")[:2] == [
        f"{info.store_path} {info.nar_size} False",
        f"{expected.store_path} 0 True",
    ]
