"""decode_canonical: canonical Directory bytes without protobuf, the same answers as protobuf's path."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from google.protobuf.message import DecodeError

from nixcas.castore.canonical import decode_canonical
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.nodes import U64_MAX, DirectoryNode, FileNode, Node, SymlinkNode
from nixcas.castore.proto import pb
from nixcas.errors import ValidationError
from nixcas.testing.daemon import clean_env


def protobuf_decode(data: bytes) -> Directory | str:
    """What the protobuf path makes of ``data``: a Directory, or the error's text."""
    msg = pb.Directory()
    try:
        msg.ParseFromString(data)
        return Directory.from_proto(msg)
    except (DecodeError, ValidationError) as e:
        return f"{type(e).__name__}: {e}"


def random_directory(rng: random.Random) -> Directory:
    entries: dict[bytes, Node] = {}
    for _ in range(rng.randrange(0, 12)):
        length = rng.choice([1, 2, 5, 20, 127, 128, 255])
        name = bytes(rng.choice([c for c in range(1, 256) if c != ord("/")]) for _ in range(length))
        if name in (b".", b".."):
            continue
        digest = B3Digest(rng.randbytes(32))
        size = rng.choice([0, 1, 127, 128, 300, 2**32, U64_MAX])
        kind = rng.randrange(3)
        if kind == 0:
            entries[name] = DirectoryNode(digest, min(size, 2**40))  # the directory's size must fit 64 bits
        elif kind == 1:
            entries[name] = FileNode(digest, size, rng.random() < 0.5)
        else:
            target = bytes(rng.randrange(1, 256) for _ in range(rng.choice([1, 100, 127, 128, 4095])))
            entries[name] = SymlinkNode(target)
    return Directory(entries)


def canonical_entries(directory: Directory) -> list[tuple[bytes, Node]]:
    """``directory``'s entries in encoding order: directories, files, symlinks, each sorted."""
    order = {DirectoryNode: 0, FileNode: 1, SymlinkNode: 2}
    return sorted(directory.entries, key=lambda e: (order[type(e[1])], e[0]))


def test_every_canonical_encoding_with_short_names_is_read() -> None:
    rng = random.Random(1)  # noqa: S311 - reproducible test data
    for _ in range(400):
        directory = random_directory(rng)
        data = directory.encode()
        entries = decode_canonical(data)
        if any(len(name) >= 128 for name, _ in directory.entries):
            assert entries is None or entries == canonical_entries(directory)  # long names: protobuf's path
            continue
        assert entries == canonical_entries(directory)
        assert Directory(entries).encode() == data


def test_encoding_is_protobufs_deterministic_serialization() -> None:
    """Directory.encode writes without protobuf exactly what protobuf's deterministic serialization gives."""
    rng = random.Random(7)  # noqa: S311 - reproducible test data
    for _ in range(400):
        directory = random_directory(rng)
        assert directory.encode() == directory.to_proto().SerializeToString(deterministic=True)


def test_empty_directory() -> None:
    assert decode_canonical(b"") == []


def mutations(data: bytes, rng: random.Random) -> list[bytes]:
    out = [data[:i] for i in range(len(data))]  # every truncation
    for _ in range(60):
        i = rng.randrange(len(data) + 1)
        out.append(data[:i] + bytes([rng.randrange(256)]) + data[i:])  # a byte inserted
        if data:
            j = rng.randrange(len(data))
            out.append(data[:j] + bytes([data[j] ^ (1 << rng.randrange(8))]) + data[j + 1 :])  # a bit flipped
    out.append(data + b"\x22\x00")  # unknown field 4
    out.append(data + b"\x0a\x00")  # an empty DirectoryNode after the others
    return out


def test_any_bytes_read_are_protobufs_answer_and_their_own_encoding() -> None:
    rng = random.Random(2)  # noqa: S311 - reproducible test data
    read = 0
    for _ in range(60):
        data = random_directory(rng).encode()
        for mutated in mutations(data, rng):
            entries = decode_canonical(mutated)
            if entries is None:
                continue
            read += 1
            expected = protobuf_decode(mutated)
            assert isinstance(expected, Directory), (mutated, expected)
            assert entries == canonical_entries(expected)
            assert Directory(entries).encode() == mutated
    assert read > 0


def entry(tag: int, *fields: bytes) -> bytes:
    body = b"".join(fields)
    return bytes([tag, len(body)]) + body


DIGEST = bytes(range(32))
NAME = b"\x0a\x01a"
GOOD_DIGEST = b"\x12\x20" + DIGEST


@pytest.mark.parametrize(
    "data",
    [
        entry(0x12, NAME, GOOD_DIGEST, b"\x18\x00"),  # size 0 written out
        entry(0x12, NAME, GOOD_DIGEST, b"\x18\x85\x00"),  # size 5 in a two-byte varint
        entry(0x12, NAME, GOOD_DIGEST, b"\x20\x00"),  # executable = false written out
        entry(0x12, NAME, GOOD_DIGEST, b"\x20\x02"),  # executable = 2
        entry(0x12, GOOD_DIGEST, NAME),  # fields out of order
        entry(0x12, NAME, NAME, GOOD_DIGEST),  # a field twice
        entry(0x12, NAME, GOOD_DIGEST, b"\x28\x01"),  # unknown field 5
        entry(0x0A, NAME, GOOD_DIGEST, b"\x20\x01"),  # executable on a directory
        entry(0x1A, NAME, b"\x12\x01x", b"\x18\x01"),  # size on a symlink
        entry(0x12, NAME, b"\x12\x1f" + DIGEST[:31]),  # a 31-byte digest
        entry(0x12, b"\x0a\x02..", GOOD_DIGEST),  # name ".."
        entry(0x12, b"\x0a\x03a/b", GOOD_DIGEST),  # name with '/'
        entry(0x12, GOOD_DIGEST),  # no name
        entry(0x1A, NAME),  # symlink without target
        entry(0x1A, NAME, b"\x12\x03a\x00b"),  # target with NUL
        entry(0x12, b"\x0a\x01b", GOOD_DIGEST) + entry(0x12, NAME, GOOD_DIGEST),  # unsorted
        entry(0x12, NAME, GOOD_DIGEST) + entry(0x12, NAME, GOOD_DIGEST),  # repeated name
        entry(0x12, NAME, GOOD_DIGEST) + entry(0x0A, b"\x0a\x01b", GOOD_DIGEST),  # lists out of order
        b"\x12\x80\x00",  # a non-shortest length
        b"\x12\x05" + NAME,  # length past the end
    ],
)
def test_non_canonical_or_invalid_bytes_go_to_protobuf(data: bytes) -> None:
    assert decode_canonical(data) is None


def test_cross_list_duplicate_is_the_same_error_either_way() -> None:
    data = entry(0x0A, NAME, GOOD_DIGEST) + entry(0x12, NAME, GOOD_DIGEST)
    entries = decode_canonical(data)
    assert entries is not None  # each list is canonical on its own; Directory rejects the pair
    with pytest.raises(ValidationError) as fast:
        Directory(entries, _names_checked=True)
    assert protobuf_decode(data) == f"{type(fast.value).__name__}: {fast.value}"


def test_directory_decode_without_protobuf_loaded() -> None:
    """In a process without protobuf, Directory.decode reads canonical bytes alone and loads it for the rest."""
    rng = random.Random(3)  # noqa: S311 - reproducible test data
    directory = random_directory(rng)
    while any(len(name) >= 128 for name, _ in directory.entries) or not len(directory):
        directory = random_directory(rng)
    odd = entry(0x12, NAME, GOOD_DIGEST, b"\x18\x00")  # valid protobuf, not canonical
    expected = protobuf_decode(odd)
    assert isinstance(expected, Directory)
    code = f"""
import sys
from nixcas.castore.directory import Directory
d = Directory.decode({directory.encode()!r})
print(d.digest.hex(), len(d), "google.protobuf.message" in sys.modules)
o = Directory.decode({odd!r})
print(o.digest.hex(), len(o), "google.protobuf.message" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=clean_env())
    assert out.stdout.split("\n")[:2] == [
        f"{directory.digest.hex()} {len(directory)} False",
        f"{expected.digest.hex()} 1 True",
    ]


def test_sizes_at_the_varint_boundaries_and_longer_forms() -> None:
    """Sizes of one, two and three varint bytes are read (the first two without read_varint); a size written in
    more bytes than it needs, or zero, is not canonical."""
    from nixcas.castore.canonical import canonical_fields

    digest = B3Digest(bytes(range(32)))
    for size in (1, 127, 128, 255, 300, 16383, 16384, 2**21 - 1, 2**21, U64_MAX):
        data = Directory([(b"f", FileNode(digest, size, size % 2 == 1))]).encode()
        assert canonical_fields(data) == [(b"f", 1, bytes(digest), size, size % 2 == 1)]
    plain = Directory([(b"f", FileNode(digest, 5))]).encode()
    assert plain.endswith(b"\x18\x05")
    for size_bytes in (b"\x85\x00", b"\x85\x80\x00", b"\x00"):  # 5 in two and three bytes; zero written out
        entry = plain[2:-1] + size_bytes
        data = bytes((plain[0], len(entry))) + entry
        assert canonical_fields(data) is None
        assert decode_canonical(data) is None
