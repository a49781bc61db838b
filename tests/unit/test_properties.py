"""Property tests (hypothesis) for the parsers that take input from outside: NAR, narinfo, Directory,
store paths and nixbase32.

Each property holds for any input: a parser either accepts and then round-trips
exactly (what it accepted is what it renders back), or refuses with its own
:class:`~nixcas.errors.ValidationError` subclass, never another exception.
Expected values come from independent encoders written here, not from the code
under test.

Each test is bounded to a few seconds: ``NIXCAS_FUZZ_EXAMPLES`` examples (100 by
default, derandomized so every run is the same).  Long-run mode: set
``NIXCAS_FUZZ_EXAMPLES`` higher (e.g. 100000) and the inputs become random per
run::

    NIXCAS_FUZZ_EXAMPLES=100000 pytest tests/unit/test_properties.py --timeout=0
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from nixcas.castore.sizerule import SizeRule
from nixcas.errors import DirectoryError, NarError, NixbaseError, PathInfoError, StorePathError, ValidationError
from nixcas.store import nixbase32
from nixcas.store.nar.ingest import ingest_nar_bytes
from nixcas.store.nar.parser import NarDirectory, NarDirectoryEnd, NarFile, NarFileChunk, NarSymlink, parse_nar
from nixcas.store.nar.render import render_nar
from nixcas.store.narinfo import NarInfo
from nixcas.store.pathinfo.model import Signature
from nixcas.store.store_path import StorePath

EXAMPLES = int(os.environ.get("NIXCAS_FUZZ_EXAMPLES", "100"))
LONG_RUN = "NIXCAS_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not LONG_RUN,
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- an independent NAR encoder ----------------------------------------------------------------

Tree = tuple[str, object]  # ("file", (bytes, executable)) | ("symlink", target) | ("dir", {name: Tree})


def _str(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


def _node(tree: Tree) -> bytes:
    kind, value = tree
    out = _str(b"(") + _str(b"type")
    if kind == "file":
        assert isinstance(value, tuple)
        contents, executable = value
        out += _str(b"regular") + (_str(b"executable") + _str(b"") if executable else b"")
        out += _str(b"contents") + _str(contents)
    elif kind == "symlink":
        out += _str(b"symlink") + _str(b"target") + _str(value)  # type: ignore[arg-type]
    else:
        out += _str(b"directory")
        for name, child in sorted(value.items()):  # type: ignore[attr-defined]
            out += _str(b"entry") + _str(b"(") + _str(b"name") + _str(name) + _str(b"node") + _node(child)
            out += _str(b")")
    return out + _str(b")")


def encode_nar(tree: Tree) -> bytes:
    return _str(b"nix-archive-1") + _node(tree)


names = st.binary(min_size=1, max_size=12).filter(lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))
targets = st.binary(min_size=1, max_size=40).filter(lambda t: b"\0" not in t)
leaves = st.one_of(
    st.tuples(st.just("file"), st.tuples(st.binary(max_size=300), st.booleans())),
    st.tuples(st.just("symlink"), targets),
)
trees: st.SearchStrategy[Tree] = st.recursive(
    leaves, lambda inner: st.tuples(st.just("dir"), st.dictionaries(names, inner, max_size=4)), max_leaves=12
)


def events_to_tree(events: list[object]) -> Tree:
    """Rebuild the tree from parser events (checks their order and paths too)."""
    stack: list[dict[bytes, Tree]] = []
    result: Tree | None = None
    file_parts: list[bytes] | None = None
    current: NarFile | None = None

    def place(path_names: tuple[bytes, ...], tree: Tree) -> None:
        nonlocal result
        if stack:
            stack[-1][path_names[-1]] = tree
        else:
            result = tree

    for event in [*events, None]:
        if current is not None and not isinstance(event, NarFileChunk):
            assert file_parts is not None
            place(current.path.below_root(), ("file", (b"".join(file_parts), current.executable)))
            current, file_parts = None, None
        if event is None:
            break
        if isinstance(event, NarFileChunk):
            assert file_parts is not None
            file_parts.append(event.data)
        elif isinstance(event, NarFile):
            assert len(event.path.below_root()) == len(stack)
            current, file_parts = event, []
        elif isinstance(event, NarSymlink):
            place(event.path.below_root(), ("symlink", event.target))
        elif isinstance(event, NarDirectory):
            assert len(event.path.below_root()) == len(stack)
            stack.append({})
        elif isinstance(event, NarDirectoryEnd):
            entries = stack.pop()
            place(event.path.below_root(), ("dir", entries))
    assert result is not None and not stack
    return result


async def _parse(data: bytes) -> list[object]:
    return [e async for e in parse_nar(data, chunk_size=7)]


async def _ingest_render(data: bytes) -> tuple[Node, bytes]:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    node, size, sha256 = await ingest_nar_bytes(data, blobs, dirs)
    assert (size, sha256) == (len(data), hashlib.sha256(data).digest())
    rendered = b"".join([c async for c in render_nar(node, blobs, dirs)])
    return node, rendered


@FUZZ
@given(trees)
def test_nar_round_trip(tree: Tree) -> None:
    data = encode_nar(tree)
    assert events_to_tree(asyncio.run(_parse(data))) == _normalise(tree)
    _, rendered = asyncio.run(_ingest_render(data))
    assert rendered == data


def _normalise(tree: Tree) -> Tree:
    kind, value = tree
    if kind == "dir":
        return ("dir", {k: _normalise(v) for k, v in value.items()})  # type: ignore[attr-defined]
    return tree


@FUZZ
@given(trees, st.data())
def test_nar_mutations_are_refused_or_canonical(tree: Tree, data: st.DataObject) -> None:
    """Any mutated NAR is refused with a NarError, or it is a valid NAR that renders back byte for byte."""
    nar = bytearray(encode_nar(tree))
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
    at = data.draw(st.integers(0, len(nar) - 1))
    if kind == "flip":
        nar[at] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del nar[at:]
    elif kind == "insert":
        nar[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        del nar[at : at + data.draw(st.integers(1, 16))]
    try:
        _, rendered = asyncio.run(_ingest_render(bytes(nar)))
    except NarError:
        return
    assert rendered == bytes(nar)


@FUZZ
@given(st.binary(max_size=400))
def test_nar_arbitrary_bytes(raw: bytes) -> None:
    for data in (raw, encode_nar(("dir", {}))[:16] + raw):
        try:
            asyncio.run(_parse(data))
        except NarError:
            continue


# -- Directory ------------------------------------------------------------------------------

digests = st.binary(min_size=32, max_size=32).map(B3Digest)
sizes = st.integers(0, 2**48)  # the sum of a directory's sizes must fit 64 bits
nodes: st.SearchStrategy[Node] = st.one_of(
    st.builds(DirectoryNode, digests, sizes),
    st.builds(FileNode, digests, sizes, st.booleans()),
    st.builds(SymlinkNode, targets),
)


@FUZZ
@given(st.dictionaries(names, nodes, max_size=6))
def test_directory_round_trip(entries: dict[bytes, Node]) -> None:
    directory = Directory(entries)
    raw = directory.encode()
    again = Directory.decode(raw)
    assert again == directory and again.encode() == raw and again.digest == B3Digest.of(raw)
    assert dict(again.entries) == entries


@FUZZ
@given(st.binary(max_size=300))
def test_directory_arbitrary_bytes(raw: bytes) -> None:
    try:
        directory = Directory.decode(raw)
    except ValidationError:
        return
    assert Directory.decode(directory.encode()) == directory


# -- store paths and nixbase32 ----------------------------------------------------------------

NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+-_?=."
store_names = st.text(alphabet=NAME_CHARS, min_size=1, max_size=211)
store_paths = st.builds(StorePath, st.binary(min_size=20, max_size=20), store_names)


@FUZZ
@given(store_paths)
def test_store_path_round_trip(path: StorePath) -> None:
    text = str(path)
    assert text == "/nix/store/" + nixbase32.encode(path.digest) + "-" + path.name
    assert StorePath.parse(text) == path == StorePath.parse(path.basename)


@FUZZ
@given(st.one_of(st.text(max_size=260), st.builds(lambda p, s: str(p) + s, store_paths, st.text(max_size=4))))
def test_store_path_arbitrary_text(text: str) -> None:
    try:
        path = StorePath.parse(text)
    except StorePathError:
        return
    assert str(path) == text or path.basename == text


@FUZZ
@given(st.binary(max_size=100))
def test_nixbase32_round_trip(data: bytes) -> None:
    text = nixbase32.encode(data)
    assert set(text) <= set(nixbase32.ALPHABET)
    assert nixbase32.decode(text) == data == nixbase32.decode(text.encode())


@FUZZ
@given(st.one_of(st.text(alphabet=nixbase32.ALPHABET + "eotu!", max_size=80), st.text(max_size=80)))
def test_nixbase32_arbitrary_text(text: str) -> None:
    try:
        data = nixbase32.decode(text)
    except NixbaseError:
        return
    assert nixbase32.encode(data) == text


# -- narinfo -----------------------------------------------------------------------------------

URL_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789/._-"
key_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-", min_size=1, max_size=20)
narinfos = st.builds(
    NarInfo,
    store_path=store_paths,
    url=st.text(alphabet=URL_CHARS, min_size=1, max_size=60),
    nar_sha256=st.binary(min_size=32, max_size=32),
    nar_size=st.integers(0, 2**63 - 1),
    references=st.lists(store_paths, max_size=4).map(lambda r: tuple(sorted(set(r)))),
    compression=st.sampled_from([None, "none", "xz", "zstd", "bzip2"]),
    deriver=st.one_of(st.none(), store_paths),
    system=st.one_of(st.none(), st.sampled_from(["x86_64-linux", "aarch64-darwin"])),
    signatures=st.lists(st.builds(Signature, key_names, st.binary(min_size=64, max_size=64)), max_size=2).map(tuple),
)


@FUZZ
@given(narinfos)
def test_narinfo_round_trip(info: NarInfo) -> None:
    text = info.render()
    parsed = NarInfo.parse(text)
    assert parsed == info
    assert parsed.render() == text


LINE_KEYS = ["StorePath", "URL", "Compression", "NarHash", "NarSize", "References", "Deriver", "Sig", "CA", "X"]


@FUZZ
@given(narinfos, st.lists(st.tuples(st.sampled_from(LINE_KEYS), st.text(max_size=70)), max_size=3), st.data())
def test_narinfo_damaged_text(info: NarInfo, lines: list[tuple[str, str]], data: st.DataObject) -> None:
    """Lines replaced or added with arbitrary text: a PathInfoError, or a narinfo that round-trips."""
    text = info.render().split("\n")
    for key, value in lines:
        text.insert(data.draw(st.integers(0, len(text))), f"{key}: {value}")
    candidate = "\n".join(text)
    assume(len(candidate) < 10_000)
    try:
        parsed = NarInfo.parse(candidate)
    except PathInfoError:
        return
    assert NarInfo.parse(parsed.render()) == parsed


@pytest.mark.parametrize("text", ["", "\n", ":", "StorePath", "Sig: \u00e9", "NarSize: \u0663"])
def test_narinfo_edge_texts(text: str) -> None:
    with pytest.raises(PathInfoError):
        NarInfo.parse(text)


def test_directory_decode_error_type() -> None:
    with pytest.raises(DirectoryError):
        Directory.decode(b"\xff")
