"""The castore data model against the interoperability vectors and the validation rules."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import blake3
import pytest

from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.graph import LeavesToRootValidator, RootToLeavesValidator
from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode, validate_name, validate_symlink_target
from nixcas.castore.proto import decode_node, encode_node, pb
from nixcas.castore.sizerule import SizeRule
from nixcas.errors import (
    ClosureError,
    DirectoryError,
    InvalidDigestError,
    InvalidNameError,
    InvalidSymlinkTargetError,
    StorageError,
    ValidationError,
)
from nixcas.testing.fixtures import (
    BLOB_A,
    BLOB_B,
    DIRECTORY_A,
    DIRECTORY_B,
    DIRECTORY_C,
    DIRECTORY_COMPLICATED,
    DIRECTORY_COMPLICATED_SNIX,
    DIRECTORY_D,
    DIRECTORY_WITH_KEEP,
    EMPTY,
    HELLOWORLD,
)

VECTORS: dict[str, Any] = json.loads((Path(__file__).parents[1] / "data" / "vectors.json").read_text())

BLOB_FIXTURES = {"EMPTY": EMPTY, "HELLOWORLD": HELLOWORLD, "BLOB_A": BLOB_A, "BLOB_B": BLOB_B}
DIRECTORY_FIXTURES = {
    "DIRECTORY_A": DIRECTORY_A,
    "DIRECTORY_WITH_KEEP": DIRECTORY_WITH_KEEP,
    "DIRECTORY_COMPLICATED": DIRECTORY_COMPLICATED,
    "DIRECTORY_B": DIRECTORY_B,
    "DIRECTORY_C": DIRECTORY_C,
    "DIRECTORY_D": DIRECTORY_D,
}


def digest_of(data: bytes) -> B3Digest:
    """Independent of nixcas: the ``blake3`` package."""
    return B3Digest(blake3.blake3(data).digest())


def directory_vector(name: str) -> dict[str, Any]:
    for v in VECTORS["directories"]:
        if v["name"].split()[0] == name:
            return dict(v)
    raise KeyError(name)


def b64url_nopad(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def b64url_nopad_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- vectors: blobs ----------------------------------------------------------------


def blob_content(v: dict[str, Any]) -> bytes:
    if "content_hex" in v:
        return bytes.fromhex(v["content_hex"])
    if "content_utf8" in v:
        return str(v["content_utf8"]).encode()
    return BLOB_FIXTURES[v["name"]]


@pytest.mark.parametrize("vector", VECTORS["blobs"], ids=lambda v: v["name"])
def test_blob_vectors(vector: dict[str, Any]) -> None:
    content = blob_content(vector)
    if vector["name"] in BLOB_FIXTURES:
        assert BLOB_FIXTURES[vector["name"]] == content
    digest = B3Digest.of(content)
    assert digest == digest_of(content)
    if "blake3_hex" in vector:
        assert digest.hex() == vector["blake3_hex"]
    if "blake3_b64" in vector:
        assert str(digest) == "b3:" + vector["blake3_b64"]
        assert digest.blake3() == "blake3-" + vector["blake3_b64"]
    if "b3_display" in vector:
        assert str(digest) == vector["b3_display"]
        assert B3Digest.parse(vector["b3_display"]) == digest


def test_blob_b_rule() -> None:
    (vector,) = [v for v in VECTORS["blobs"] if v["name"] == "BLOB_B"]
    assert "1044480 bytes" in vector["content_rule"]
    assert len(BLOB_B) == 1044480
    assert BLOB_B[:3] == b"\x00\x01\x02"
    assert BLOB_B[254:257] == b"\xfe\x00\x01"
    assert BLOB_B[-1] == 254


def test_all_blob_fixtures_have_vectors() -> None:
    assert set(BLOB_FIXTURES) <= {v["name"] for v in VECTORS["blobs"]}


# -- vectors: directories -------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS["directories"], ids=lambda v: v["name"].split()[0])
def test_directory_vectors(vector: dict[str, Any]) -> None:
    directory = DIRECTORY_FIXTURES[vector["name"].split()[0]]
    canonical = bytes.fromhex(vector["canonical_protobuf_hex"])
    # the vector is self-consistent
    assert digest_of(canonical).hex() == vector["digest_hex"]
    # the model produces it
    assert directory.encode().hex() == vector["canonical_protobuf_hex"]
    assert directory.digest.hex() == vector["digest_hex"]
    assert directory.size_under(SizeRule.TVIX) == vector["size_rust_compat"]
    assert directory.node(SizeRule.TVIX) == DirectoryNode(
        B3Digest(bytes.fromhex(vector["digest_hex"])), vector["size_rust_compat"]
    )
    # and parses it back
    parsed = Directory.decode(canonical)
    assert parsed.entries == directory.entries
    assert parsed.digest.hex() == vector["digest_hex"]
    assert parsed.size_under(SizeRule.TVIX) == vector["size_rust_compat"]
    assert parsed == directory


def test_all_directory_fixtures_have_vectors() -> None:
    assert {v["name"].split()[0] for v in VECTORS["directories"]} == set(DIRECTORY_FIXTURES)


def test_spec_size_variant_digests() -> None:
    """With the proto-comment size rule the digests differ; the note names them."""
    note = VECTORS["directory_size_note"]
    complicated = re.search(r"COMPLICATED would be size (\d+) and digest ([0-9a-f]{64})", note)
    d = re.search(r"D size (\d+) and digest ([0-9a-f]{64})", note)
    assert complicated is not None
    assert d is not None
    entries: dict[bytes, Node] = {
        b"keep": DirectoryNode(DIRECTORY_WITH_KEEP.digest, 1),
        b".keep": FileNode(EMPTY_DIGEST, 0),
        b"aa": SymlinkNode(b"/nix/store/somewhereelse"),
    }
    spec_complicated = Directory(entries)
    assert spec_complicated.digest.hex() == complicated.group(2)
    spec_d = Directory({b"a": DirectoryNode(DIRECTORY_A.digest, 0), b"b": DirectoryNode(DIRECTORY_B.digest, 1)})
    assert spec_d.digest.hex() == d.group(2)
    # and the tvix rule is what we compute under it
    assert DIRECTORY_COMPLICATED.size_under(SizeRule.TVIX) != int(complicated.group(1))
    assert DIRECTORY_D.size_under(SizeRule.TVIX) != int(d.group(1))
    # the snix rule sizes 'keep' (one file) as the proto comment does (1), so the snix-rule
    # COMPLICATED is the tree this reference vector names
    assert DIRECTORY_COMPLICATED_SNIX.digest.hex() == complicated.group(2)


def test_empty_directory_digest_is_empty_blob_digest() -> None:
    assert DIRECTORY_A.encode() == b""
    assert DIRECTORY_A.digest == EMPTY_DIGEST == digest_of(b"")


def test_unknown_fields_are_dropped() -> None:
    """The digest is over the canonical re-encoding, not over what was received."""
    canonical = bytes.fromhex(directory_vector("DIRECTORY_WITH_KEEP")["canonical_protobuf_hex"])
    with_unknown = canonical + b"\x78\x01"  # field 15, varint 1
    parsed = Directory.decode(with_unknown)
    assert parsed.encode() == canonical
    assert parsed.digest.hex() == directory_vector("DIRECTORY_WITH_KEEP")["digest_hex"]


# -- vectors: anonymous root nodes ----------------------------------------------------


def anonymous_nodes() -> dict[str, Node]:
    return {
        "symlink /nix/store/somewhereelse": SymlinkNode(b"/nix/store/somewhereelse"),
        "file HELLOWORLD size 12 not executable": FileNode(digest_of(HELLOWORLD), 12, executable=False),
        "directory COMPLICATED size 8": DirectoryNode(
            B3Digest(bytes.fromhex(directory_vector("DIRECTORY_COMPLICATED")["digest_hex"])), 8
        ),
    }


def test_anonymous_node_vectors_covered() -> None:
    assert set(VECTORS["anonymous_root_nodes_b64url_nopad"]) == set(anonymous_nodes())


@pytest.mark.parametrize("key", sorted(VECTORS["anonymous_root_nodes_b64url_nopad"]))
def test_anonymous_node_vectors(key: str) -> None:
    expected = VECTORS["anonymous_root_nodes_b64url_nopad"][key]
    node = anonymous_nodes()[key]
    encoded = encode_node(b"", node)
    assert b64url_nopad(encoded) == expected
    assert decode_node(b64url_nopad_decode(expected), anonymous=True) == (b"", node)


@pytest.mark.parametrize("key", sorted(VECTORS["anonymous_root_nodes_b64url_nopad"]))
def test_anonymous_node_rejects_name(key: str) -> None:
    node = anonymous_nodes()[key]
    named = encode_node(b"foo", node)
    assert decode_node(named) == (b"foo", node)
    with pytest.raises(ValidationError):
        decode_node(named, anonymous=True)
    # and a named context rejects the empty name
    with pytest.raises(InvalidNameError):
        decode_node(encode_node(b"", node))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="no-node-set"),
        pytest.param(b"\xff", id="garbage"),
        pytest.param(b"\x0a\x05\x01", id="truncated"),
        pytest.param(pb.Node(file=pb.FileNode(digest=b"\x00" * 31)).SerializeToString(), id="short-digest"),
        pytest.param(pb.Node(directory=pb.DirectoryNode(digest=b"\x00" * 33)).SerializeToString(), id="long-digest"),
        pytest.param(pb.Node(symlink=pb.SymlinkNode(target=b"")).SerializeToString(), id="empty-target"),
        pytest.param(pb.Node(symlink=pb.SymlinkNode(target=b"a\0b")).SerializeToString(), id="nul-target"),
    ],
)
def test_decode_node_invalid(data: bytes) -> None:
    with pytest.raises(ValidationError):
        decode_node(data, anonymous=True)


# -- B3Digest --------------------------------------------------------------------------

HW = digest_of(HELLOWORLD)


@pytest.mark.parametrize(
    "text",
    [
        HW.hex(),
        HW.hex().upper(),
        "b3:" + base64.b64encode(HW).decode(),
        "blake3-" + base64.b64encode(HW).decode(),
        "  " + HW.hex() + "\n",
    ],
)
def test_digest_parse(text: str) -> None:
    assert B3Digest.parse(text) == HW


def test_digest_display() -> None:
    assert str(HW) == "b3:XKeBWty0hOmhNsEe/mnB1TAXbVSbXRjQOOtSgLSzRww="
    assert HW.b3() == str(HW)
    assert HW.blake3() == "blake3-XKeBWty0hOmhNsEe/mnB1TAXbVSbXRjQOOtSgLSzRww="
    assert HW.hex() == "5ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c"
    assert HW.hex() in repr(HW)
    assert B3Digest.parse(str(HW)) == HW
    assert B3Digest.parse(HW.blake3()) == HW


def test_digest_is_bytes() -> None:
    raw = blake3.blake3(HELLOWORLD).digest()
    assert B3Digest(raw) == raw
    assert hash(B3Digest(raw)) == hash(raw)
    assert {B3Digest(raw): 1}[B3Digest(bytearray(raw))] == 1
    assert B3Digest.of(HELLOWORLD) == B3Digest(memoryview(raw))


@pytest.mark.parametrize("length", [0, 1, 31, 33, 64])
def test_digest_wrong_length(length: int) -> None:
    with pytest.raises(InvalidDigestError):
        B3Digest(b"\x01" * length)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param(HW.hex()[:-2], id="hex-31-bytes"),
        pytest.param(HW.hex() + "00", id="hex-33-bytes"),
        pytest.param(HW.hex()[:-1], id="hex-odd"),
        pytest.param("zz" * 32, id="hex-junk"),
        pytest.param("b3:", id="b3-empty"),
        pytest.param("b3:" + base64.b64encode(HW[:31]).decode(), id="b3-31-bytes"),
        pytest.param("b3:" + base64.b64encode(HW + b"\0").decode(), id="b3-33-bytes"),
        pytest.param("b3:!!!!", id="b3-junk"),
        pytest.param("b3:" + base64.b64encode(HW).decode().rstrip("="), id="b3-unpadded"),
        pytest.param("blake3-" + base64.b64encode(HW[:16]).decode(), id="blake3-16-bytes"),
        pytest.param("sha256-" + base64.b64encode(HW).decode(), id="other-prefix"),
        pytest.param("B3:" + base64.b64encode(HW).decode(), id="uppercase-prefix"),
        pytest.param("nonsense", id="junk"),
    ],
)
def test_digest_parse_invalid(text: str) -> None:
    with pytest.raises(InvalidDigestError):
        B3Digest.parse(text)


# -- names and symlink targets --------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b".", id="dot"),
        pytest.param(b"..", id="dotdot"),
        pytest.param(b"/", id="slash"),
        pytest.param(b"a/b", id="a/b"),
        pytest.param(b"a/", id="trailing-slash"),
        pytest.param(b"\0", id="nul"),
        pytest.param(b"a\0b", id="inner-nul"),
        pytest.param(b"X" * 256, id="256-bytes"),
        pytest.param(b"X" * 500, id="500-bytes"),
    ],
)
def test_invalid_names(name: bytes) -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_name(name)
    assert info.value.name == name
    with pytest.raises(InvalidNameError):
        Directory({name: SymlinkNode(b"x")})


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(b"X" * 255, id="255-bytes"),
        pytest.param(b"\xc5\xc4\xd6", id="non-utf8"),
        pytest.param(b"...", id="three-dots"),
        pytest.param(b".keep", id="dotfile"),
        pytest.param(b"a b\n\t\\", id="whitespace-backslash"),
        pytest.param(b"\xff" * 255, id="255-bytes-non-utf8"),
    ],
)
def test_valid_names(name: bytes) -> None:
    assert validate_name(name) == name
    d = Directory({name: SymlinkNode(b"x")})
    assert Directory.decode(d.encode()).entries == ((name, SymlinkNode(b"x")),)


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\0", id="nul"),
        pytest.param(b"/nix/store/a\0b", id="inner-nul"),
        pytest.param(b"x" * 4096, id="4096-bytes"),
        pytest.param(b"x" * 5000, id="5000-bytes"),
    ],
)
def test_invalid_symlink_targets(target: bytes) -> None:
    with pytest.raises(InvalidSymlinkTargetError) as info:
        validate_symlink_target(target)
    assert info.value.target == target
    with pytest.raises(InvalidSymlinkTargetError):
        SymlinkNode(target)


@pytest.mark.parametrize(
    "target",
    [b".", b"..", b"./..", b"a/b", b"/a/b", b"\xc5\xc4\xd6", b"x" * 4095, b"/", b"//"],
)
def test_valid_symlink_targets(target: bytes) -> None:
    assert validate_symlink_target(target) == target
    assert SymlinkNode(target).target == target


@pytest.mark.parametrize("size", [-1, 2**64])
def test_node_size_out_of_range(size: int) -> None:
    with pytest.raises(ValidationError):
        FileNode(EMPTY_DIGEST, size)
    with pytest.raises(ValidationError):
        DirectoryNode(EMPTY_DIGEST, size)


def test_node_digest_length() -> None:
    with pytest.raises(InvalidDigestError):
        FileNode(b"\0" * 31, 0)  # type: ignore[arg-type]
    with pytest.raises(InvalidDigestError):
        DirectoryNode(b"\0" * 33, 0)  # type: ignore[arg-type]


# -- Directory: size rule and construction -------------------------------------------


D0 = EMPTY_DIGEST


@pytest.mark.parametrize(
    ("entries", "size"),
    [
        pytest.param({}, 0, id="empty"),
        pytest.param({b"f": FileNode(D0, 123)}, 2, id="one-file"),
        pytest.param({b"f": FileNode(D0, 2**64 - 1, executable=True)}, 2, id="file-size-irrelevant"),
        pytest.param({b"l": SymlinkNode(b"t")}, 2, id="one-symlink"),
        pytest.param({b"d": DirectoryNode(D0, 0)}, 2, id="subdir-0"),
        pytest.param({b"d": DirectoryNode(D0, 7)}, 9, id="subdir-7"),
        pytest.param({b"d": DirectoryNode(D0, 2**64 - 3)}, 2**64 - 1, id="subdir-max"),
        pytest.param(
            {b"a": FileNode(D0, 1), b"b": SymlinkNode(b"t"), b"c": DirectoryNode(D0, 5), b"e": DirectoryNode(D0, 4)},
            8 + 5 + 4,
            id="mixed",
        ),
    ],
)
def test_directory_size(entries: dict[bytes, Node], size: int) -> None:
    d = Directory(entries)
    assert d.size_under(SizeRule.TVIX) == size
    assert d.node(SizeRule.TVIX).size == size
    assert Directory.decode(d.encode()).size_under(SizeRule.TVIX) == size


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param({b"d": DirectoryNode(D0, 2**64 - 2)}, id="one-child"),
        pytest.param({b"d": DirectoryNode(D0, 2**63), b"e": DirectoryNode(D0, 2**63)}, id="two-children"),
        pytest.param({b"d": DirectoryNode(D0, 2**64 - 3), b"f": FileNode(D0, 0)}, id="child-plus-file"),
    ],
)
def test_directory_size_overflow(entries: dict[bytes, Node]) -> None:
    with pytest.raises(DirectoryError):
        Directory(entries)


def test_directory_duplicate_name() -> None:
    with pytest.raises(DirectoryError):
        Directory([(b"a", FileNode(D0, 0)), (b"a", SymlinkNode(b"x"))])


def test_directory_entries_sorted_across_kinds() -> None:
    d = Directory(
        [
            (b"c", FileNode(D0, 0)),
            (b"bb", SymlinkNode(b"x")),
            (b"b", DirectoryNode(D0, 0)),
            (b"a", FileNode(D0, 0, executable=True)),
            (b"B", SymlinkNode(b"y")),
        ]
    )
    assert [name for name, _ in d] == [b"B", b"a", b"b", b"bb", b"c"]
    assert [name for name, _ in d.directories()] == [b"b"]
    assert d.get(b"bb") == SymlinkNode(b"x")
    assert d.get(b"zz") is None
    assert b"a" in d
    assert len(d) == 5
    msg = d.to_proto()
    assert [e.name for e in msg.directories] == [b"b"]
    assert [e.name for e in msg.files] == [b"a", b"c"]
    assert [e.name for e in msg.symlinks] == [b"B", b"bb"]


def test_directory_construction_order_irrelevant() -> None:
    items: list[tuple[bytes, Node]] = [(b"x", FileNode(D0, 1)), (b"a", SymlinkNode(b"t")), (b"m", DirectoryNode(D0, 0))]
    assert Directory(items).encode() == Directory(list(reversed(items))).encode()


# -- Directory: protobuf validation -----------------------------------------------------

GOOD = EMPTY_DIGEST
LISTS = ["directories", "files", "symlinks"]


def add(msg: pb.Directory, kind: str, name: bytes, *, digest: bytes = GOOD, target: bytes = b"t") -> None:
    if kind == "directories":
        msg.directories.add(name=name, digest=digest, size=0)
    elif kind == "files":
        msg.files.add(name=name, digest=digest, size=0)
    else:
        msg.symlinks.add(name=name, target=target)


def message(*entries: tuple[str, bytes]) -> pb.Directory:
    msg = pb.Directory()
    for kind, name in entries:
        add(msg, kind, name)
    return msg


def parse_both_ways(msg: pb.Directory) -> list[Exception]:
    """Errors raised by from_proto and by decode of the serialized form."""
    errors: list[Exception] = []

    def from_proto() -> Directory:
        return Directory.from_proto(msg)

    def decode() -> Directory:
        return Directory.decode(msg.SerializeToString())

    for parse in (from_proto, decode):
        try:
            parse()
        except Exception as e:
            errors.append(e)
    return errors


@pytest.mark.parametrize("kind", LISTS)
def test_proto_wrong_sorting(kind: str) -> None:
    errors = parse_both_ways(message((kind, b"b"), (kind, b"a")))
    assert len(errors) == 2
    assert all(isinstance(e, DirectoryError) for e in errors)
    assert all("a" in str(e) for e in errors)


@pytest.mark.parametrize("kind", LISTS)
def test_proto_duplicate_within_list(kind: str) -> None:
    errors = parse_both_ways(message((kind, b"a"), (kind, b"a")))
    assert len(errors) == 2
    assert all(isinstance(e, DirectoryError) for e in errors)


@pytest.mark.parametrize(
    ("first", "second"), [("directories", "files"), ("files", "symlinks"), ("directories", "symlinks")]
)
def test_proto_duplicate_across_lists(first: str, second: str) -> None:
    errors = parse_both_ways(message((first, b"a"), (second, b"a")))
    assert len(errors) == 2
    assert all(isinstance(e, DirectoryError) for e in errors)


@pytest.mark.parametrize("kind", ["directories", "files"])
@pytest.mark.parametrize("length", [0, 31, 33])
def test_proto_wrong_digest_length(kind: str, length: int) -> None:
    msg = pb.Directory()
    add(msg, kind, b"foo", digest=b"\x01" * length)
    errors = parse_both_ways(msg)
    assert len(errors) == 2
    assert all(isinstance(e, DirectoryError) for e in errors)
    assert all("foo" in str(e) for e in errors)


@pytest.mark.parametrize("target", [b"", b"a\0b", b"x" * 4096])
def test_proto_invalid_symlink_target(target: bytes) -> None:
    msg = pb.Directory()
    add(msg, "symlinks", b"foo", target=target)
    errors = parse_both_ways(msg)
    assert len(errors) == 2
    assert all(isinstance(e, ValidationError) for e in errors)
    assert all("foo" in str(e) for e in errors)


@pytest.mark.parametrize("kind", LISTS)
@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"a\0", b"X" * 256], ids=repr)
def test_proto_invalid_name(kind: str, name: bytes) -> None:
    errors = parse_both_ways(message((kind, name)))
    assert len(errors) == 2
    assert all(isinstance(e, InvalidNameError) for e in errors)


@pytest.mark.parametrize("kind", LISTS)
def test_proto_empty_first_name(kind: str) -> None:
    """Comparison starts at the empty string: an empty first name is a name error."""
    errors = parse_both_ways(message((kind, b""), (kind, b"a")))
    assert len(errors) == 2
    assert all(isinstance(e, InvalidNameError) for e in errors)


def test_proto_size_overflow() -> None:
    msg = pb.Directory()
    msg.directories.add(name=b"a", digest=GOOD, size=2**64 - 2)
    errors = parse_both_ways(msg)
    assert len(errors) == 2
    assert all(isinstance(e, DirectoryError) for e in errors)
    ok = pb.Directory()
    ok.directories.add(name=b"a", digest=GOOD, size=2**64 - 3)
    assert Directory.from_proto(ok).size_under(SizeRule.TVIX) == 2**64 - 1


def test_proto_valid_multi_list() -> None:
    msg = message(
        ("directories", b"b"),
        ("directories", b"d"),
        ("files", b"a"),
        ("files", b"e"),
        ("symlinks", b"c"),
        ("symlinks", b"f"),
    )
    d = Directory.from_proto(msg)
    assert [name for name, _ in d] == [b"a", b"b", b"c", b"d", b"e", b"f"]
    assert d.size_under(SizeRule.TVIX) == 12  # 2 * 6 entries
    assert d.size_under(SizeRule.SNIX) == 8  # 2 files + 2 symlinks + 2 * 2 directories
    assert d.encode() == msg.SerializeToString(deterministic=True)
    assert Directory.decode(msg.SerializeToString()).digest == d.digest == digest_of(d.encode())


@pytest.mark.parametrize("data", [b"\xff", b"\x0a\x05\x0a", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"])
def test_directory_undecodable(data: bytes) -> None:
    with pytest.raises(DirectoryError):
        Directory.decode(data)


# -- closure validators --------------------------------------------------------------------


def leaves_to_root(*dirs: Directory) -> tuple[B3Digest, list[Directory]]:
    v = LeavesToRootValidator(SizeRule.TVIX)
    for d in dirs:
        v.add(d)
    return v.finish()


def test_l2r_empty() -> None:
    with pytest.raises(ClosureError):
        LeavesToRootValidator(SizeRule.TVIX).finish()


def test_l2r_single() -> None:
    assert leaves_to_root(DIRECTORY_A) == (DIRECTORY_A.digest, [DIRECTORY_A])


def test_l2r_simple_closure() -> None:
    root, dirs = leaves_to_root(DIRECTORY_WITH_KEEP, DIRECTORY_COMPLICATED)
    assert root.hex() == directory_vector("DIRECTORY_COMPLICATED")["digest_hex"]
    assert dirs == [DIRECTORY_WITH_KEEP, DIRECTORY_COMPLICATED]


def test_l2r_same_child_twice() -> None:
    root, dirs = leaves_to_root(DIRECTORY_A, DIRECTORY_C)
    assert root == DIRECTORY_C.digest
    assert dirs == [DIRECTORY_A, DIRECTORY_C]


def test_l2r_dedup() -> None:
    v = LeavesToRootValidator(SizeRule.TVIX)
    assert v.add(DIRECTORY_A) is True
    assert v.add(DIRECTORY_A) is False
    assert v.add(DIRECTORY_B) is True
    assert v.add(DIRECTORY_D) is True
    assert v.add(DIRECTORY_B) is False
    assert v.finish() == (DIRECTORY_D.digest, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])


def test_l2r_unconnected() -> None:
    v = LeavesToRootValidator(SizeRule.TVIX)
    v.add(DIRECTORY_A)
    v.add(DIRECTORY_WITH_KEEP)
    with pytest.raises(ClosureError):
        v.finish()


def test_l2r_dangling_pointer() -> None:
    v = LeavesToRootValidator(SizeRule.TVIX)
    with pytest.raises(ClosureError):
        v.add(DIRECTORY_B)


def test_l2r_parent_before_child() -> None:
    v = LeavesToRootValidator(SizeRule.TVIX)
    with pytest.raises(ClosureError):
        v.add(DIRECTORY_D)


@pytest.mark.parametrize("size", [1, 2, 100])
def test_l2r_wrong_size(size: int) -> None:
    v = LeavesToRootValidator(SizeRule.TVIX)
    v.add(DIRECTORY_A)
    with pytest.raises(ClosureError):
        v.add(Directory({b"a": DirectoryNode(DIRECTORY_A.digest, size)}))


def test_l2r_wrong_size_second_level() -> None:
    v = LeavesToRootValidator(SizeRule.TVIX)
    v.add(DIRECTORY_A)
    v.add(DIRECTORY_B)
    with pytest.raises(ClosureError):
        v.add(Directory({b"b": DirectoryNode(DIRECTORY_B.digest, 1)}))  # B has size 2


def root_to_leaves(root: B3Digest, *dirs: Directory) -> None:
    v = RootToLeavesValidator(root, SizeRule.TVIX)
    for d in dirs:
        v.add(d)
    v.finish()


@pytest.mark.parametrize(
    "order",
    [
        pytest.param([DIRECTORY_D, DIRECTORY_A, DIRECTORY_B], id="D-A-B"),
        pytest.param([DIRECTORY_D, DIRECTORY_B, DIRECTORY_A], id="D-B-A"),
        pytest.param([DIRECTORY_COMPLICATED, DIRECTORY_WITH_KEEP], id="complicated"),
        pytest.param([DIRECTORY_C, DIRECTORY_A], id="same-child-twice"),
        pytest.param([DIRECTORY_A], id="single"),
    ],
)
def test_r2l_accepts(order: list[Directory]) -> None:
    root_to_leaves(order[0].digest, *order)


def test_r2l_unexpected_root() -> None:
    v = RootToLeavesValidator(DIRECTORY_D.digest, SizeRule.TVIX)
    with pytest.raises(StorageError):
        v.add(DIRECTORY_B)


def test_r2l_leaves_first_rejected() -> None:
    v = RootToLeavesValidator(DIRECTORY_D.digest, SizeRule.TVIX)
    with pytest.raises(StorageError):
        v.add(DIRECTORY_A)


def test_r2l_unrelated_directory() -> None:
    v = RootToLeavesValidator(DIRECTORY_D.digest, SizeRule.TVIX)
    v.add(DIRECTORY_D)
    with pytest.raises(StorageError):
        v.add(DIRECTORY_WITH_KEEP)


def test_r2l_incomplete() -> None:
    v = RootToLeavesValidator(DIRECTORY_D.digest, SizeRule.TVIX)
    v.add(DIRECTORY_D)
    v.add(DIRECTORY_B)
    with pytest.raises(StorageError):
        v.finish()  # A was announced but never received


def test_r2l_nothing_received() -> None:
    with pytest.raises(StorageError):
        RootToLeavesValidator(DIRECTORY_A.digest, SizeRule.TVIX).finish()
