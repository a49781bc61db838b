"""NAR listings (``<hash>.ls``) computed from castore, checked against the NAR bytes and the tree on disk.

The offsets are checked independently of the listing code: the NAR is rendered
(the renderer is checked byte for byte against nix-store --dump in
test_nix_compat) and the bytes at each ``narOffset`` must be the file's
contents as read from disk, preceded by its size as NAR framing.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.ingest import ingest_path
from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from nixcas.castore.sizerule import SizeRule
from nixcas.store.nar.listing import LISTING_CHUNK, UnlistableName, check_listable, nar_listing
from nixcas.store.nar.plan import NarContentNotFound, fetch_closure
from nixcas.store.nar.render import render_nar
from nixcas.testing.nix import fixed_tree

RULE = SizeRule.SNIX


async def listed(path: Path) -> tuple[dict[str, Any], bytes, list[bytes]]:
    """The listing (parsed), the NAR and the listing's chunks of the tree at ``path``."""
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(RULE)
    node = await ingest_path(path, blobs, dirs)
    nar = b"".join([c async for c in render_nar(node, blobs, dirs)])
    closure = await fetch_closure(node, dirs)
    check_listable(node, closure)
    chunks = list(nar_listing(node, closure))
    return json.loads(b"".join(chunks)), nar, chunks


def check_against_disk(entry: dict[str, Any], path: Path, nar: bytes) -> int:
    """``entry`` describes ``path`` exactly, its offsets point at the contents in ``nar``; the files seen."""
    if path.is_symlink():
        assert entry == {"type": "symlink", "target": os.readlink(path)}
        return 0
    if path.is_dir():
        assert set(entry) == {"type", "entries"} and entry["type"] == "directory"
        names = sorted(os.listdir(path), key=os.fsencode)
        assert list(entry["entries"]) == names  # NAR order: sorted by the names' bytes
        return sum(check_against_disk(entry["entries"][n], path / n, nar) for n in names)
    data = path.read_bytes()
    executable = os.access(path, os.X_OK)
    expected = {"type": "regular", "size": len(data), "narOffset": entry["narOffset"]}
    if executable:
        expected["executable"] = True
    assert entry == expected
    offset = entry["narOffset"]
    assert nar[offset - 8 : offset] == struct.pack("<Q", len(data))  # the size field of the contents
    assert nar[offset : offset + len(data)] == data
    assert nar[offset + len(data) : offset + len(data) + (-len(data) % 8)] == bytes(-len(data) % 8)
    return 1


async def test_listing_offsets_point_at_the_contents_in_the_nar(tmp_path: Path) -> None:
    tree = fixed_tree(tmp_path / "tree")
    (tree / "share" / "deep" / "er").mkdir(parents=True)
    for size in range(1, 18):  # every padding length, names of every padding length
        (tree / "share" / "deep" / "er" / ("n" * size)).write_bytes(bytes(range(size)))
    listing, nar, _ = await listed(tree)
    assert set(listing) == {"version", "root"} and listing["version"] == 1
    assert check_against_disk(listing["root"], tree, nar) > 20


async def test_listing_text_of_a_small_tree(tmp_path: Path) -> None:
    """Offsets worked out by hand: magic 24, directory 56, entry 80 (name "a"), regular 64, size 8."""
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a").write_bytes(b"x")
    (tmp_path / "t" / "b").symlink_to("a")
    _, _, chunks = await listed(tmp_path / "t")
    assert b"".join(chunks) == (
        b'{"root":{"entries":{"a":{"narOffset":232,"size":1,"type":"regular"},'
        b'"b":{"target":"a","type":"symlink"}},"type":"directory"},"version":1}'
    )


async def test_listing_of_a_file_or_a_symlink_at_the_root(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"hello")
    (tmp_path / "f").chmod(0o755)
    (tmp_path / "l").symlink_to("/nix/store/elsewhere")
    for name in "f", "l":
        listing, nar, _ = await listed(tmp_path / name)
        check_against_disk(listing["root"], tmp_path / name, nar)
    listing, _, _ = await listed(tmp_path / "f")
    # magic 24, "(" 16, "type" 16, "regular" 16, "executable" 24, "" 8, "contents" 16, size 8
    assert listing["root"] == {"type": "regular", "size": 5, "executable": True, "narOffset": 128}


async def test_big_listings_come_in_bounded_chunks() -> None:
    names = [f"file-with-a-long-name-{i:05d}".encode() for i in range(3000)]
    directory = Directory({name: FileNode(EMPTY_DIGEST, 0) for name in names})
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(RULE)
    await dirs.put(directory)
    nar = b"".join([c async for c in render_nar(directory.node(RULE), blobs, dirs)])
    chunks = list(nar_listing(directory.node(RULE), {directory.digest: directory}))
    assert len(chunks) > 2
    assert max(len(c) for c in chunks) < LISTING_CHUNK + 200
    entries = json.loads(b"".join(chunks))["root"]["entries"]
    assert list(entries) == [n.decode() for n in names]
    for entry in entries.values():
        assert entry["size"] == 0 and nar[entry["narOffset"] - 8 : entry["narOffset"]] == bytes(8)  # a size of 0
    offsets = [e["narOffset"] for e in entries.values()]
    assert offsets == sorted(set(offsets)) and offsets[-1] < len(nar)


def test_names_and_targets_that_are_not_utf8_cannot_be_listed() -> None:
    bad_name = Directory({b"caf\xe9": SymlinkNode(b"x")})
    with pytest.raises(UnlistableName, match=r"a name .* not UTF-8"):
        check_listable(bad_name.node(RULE), {bad_name.digest: bad_name})
    with pytest.raises(UnlistableName, match=r"a symlink target .* not UTF-8"):
        check_listable(SymlinkNode(b"\xff"), {})


def test_a_missing_directory_is_named() -> None:
    child = Directory({b"f": FileNode(B3Digest(hashlib.sha256(b"f").digest()), 1)})
    parent = Directory({b"sub": child.node(RULE)})
    node: Node = parent.node(RULE)
    assert isinstance(node, DirectoryNode)
    with pytest.raises(NarContentNotFound, match="/sub"):
        list(nar_listing(node, {parent.digest: parent}))
