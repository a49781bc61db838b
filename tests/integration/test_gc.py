"""Garbage collection: roots, pins, delete, grace, re-put, chunked blobs, leases, concurrency, migration."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import blake3
import pytest

from nixcas.api import Store
from nixcas.castore.blob.local import LocalBlobService
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.blob.packed import PackedBlobService
from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.dirs.sqlite import SqliteDirectoryService
from nixcas.castore.gc import Deletion, StoredObject, WriteLeases, collect, parse_duration
from nixcas.castore.nodes import FileNode
from nixcas.castore.objectstore.layout import blob_index_key, chunk_key, decode_index
from nixcas.castore.sizerule import SizeRule
from nixcas.errors import ConfigurationError, StorageError
from nixcas.testing.maintenance import dump_path, import_all, nixcas, one_line_error, write_chunked, write_tree
from nixcas.testing.nix import NIX_STORE, run_nix

HOUR_NS = 3600 * 10**9


def contents(root: Path) -> set[bytes]:
    """BLAKE3 of every file's bytes (computed here, not by the store)."""
    return {blake3.blake3(p.read_bytes()).digest() for p in root.rglob("*") if p.is_file()}


def subtrees(root: Path) -> set[object]:
    """Every distinct directory below and including ``root``, as a structural value (equal iff equal content)."""
    found: set[object] = set()

    def shape(d: Path) -> object:
        entries = []
        for child in sorted(d.iterdir()):
            if child.is_dir():
                entries.append((child.name, "d", shape(child)))
            else:
                entries.append((child.name, "f", blake3.blake3(child.read_bytes()).digest()))
        value = tuple(entries)
        found.add(value)
        return value

    shape(root)
    return found


LIB: dict[str, object] = {"l1": b"library one\n", "l2": b"library two\n" * 100}


@pytest.fixture
def trees(tmp_path: Path) -> dict[str, Path]:
    big = os.urandom(2 * 1024 * 1024 + 5)  # written through the streaming (spilling) writer
    return {
        "a": write_tree(
            tmp_path / "src" / "a",
            {"shared": {"lib": LIB}, "common.txt": b"common\n", "a-only": {"x": b"a1\n", "y": b"a2\n"}, "R": b"A\n"},
        ),
        "b": write_tree(
            tmp_path / "src" / "b",
            {
                "shared": {"lib": LIB},
                "common.txt": b"common\n",
                "b-only": {"p": b"b1\n", "q": b"b2\n", "deeper": {"z": b"b3\n"}},
                "R": b"B\n",
                "empty": b"",
                "big": big,
            },
        ),
        "c": write_tree(
            tmp_path / "src" / "c",
            {"lib": LIB, "also-b1": b"b1\n", "R": b"C\n", "empty": b""},
        ),
    }


def chunk_objects(blob_root: Path, blobs: set[bytes]) -> set[bytes]:
    """The chunk objects the given blobs use, read from their index files on disk."""
    out: set[bytes] = set()
    for raw in blobs:
        digest = B3Digest(raw)
        index = (blob_root / blob_index_key(digest)).read_bytes()
        listed = decode_index(digest, index)
        out.update(c.digest for c in listed) if listed else out.add(raw)
    return out


def backdate(store: Path, seconds: int, *, directories: bool = True) -> None:
    """Make every object of the store look ``seconds`` older."""
    for p in (store / "blobs").rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 10**9))
    if (store / "blobs" / "packs.sqlite").exists():  # small blobs are rows (packed://)
        with sqlite3.connect(store / "blobs" / "packs.sqlite") as conn:
            conn.execute("UPDATE blobs SET mtime_ns = mtime_ns - ?", (seconds * 10**9,))
    if not directories:
        return
    with sqlite3.connect(store / "directories.sqlite") as conn:
        conn.execute("UPDATE directories SET mtime = mtime - ?", (seconds * 10**9,))


def gc_json(store: Path, *args: str) -> dict[str, object]:
    result = nixcas("gc", "--json", *args, store=store)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def freed(report: dict[str, object], kind: str) -> tuple[int, int]:
    k = report["kinds"][kind]  # type: ignore[index]
    return k["freed"], k["freed_bytes"]


async def test_gc_frees_exactly_the_unshared_objects(tmp_path: Path, trees: dict[str, Path]) -> None:
    store = tmp_path / "store"
    # Blobs as files of the object layout (a store written before packed://): what each removes is visible.
    a, b, c = await import_all(store, [trees["a"], trees["b"], trees["c"]], object_layout=True)
    blob_root = store / "blobs"

    # Counted independently of the store: file contents and directory shapes.
    keep_blobs = contents(trees["a"]) | contents(trees["c"])
    gone_blobs = contents(trees["b"]) - keep_blobs - {EMPTY_DIGEST}
    gone_dirs = subtrees(trees["b"]) - subtrees(trees["a"]) - subtrees(trees["c"])
    gone_chunks = chunk_objects(blob_root, gone_blobs) - chunk_objects(blob_root, keep_blobs)
    chunk_bytes = sum((blob_root / chunk_key(B3Digest(d))).stat().st_size for d in gone_chunks)
    assert len(gone_blobs) == 4 and len(gone_dirs) == 3  # q, z, R, big (b1 is in c too); b, b-only, deeper

    result = nixcas("delete", str(b.store_path), store=store)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"deleted {b.store_path}"

    dry = gc_json(store, "--grace", "0s", "--dry-run")
    assert dry["dry_run"] is True and freed(dry, "blob")[0] == len(gone_blobs)
    assert all((blob_root / blob_index_key(B3Digest(d))).exists() for d in gone_blobs)

    report = gc_json(store, "--grace", "0s")
    assert freed(report, "blob")[0] == len(gone_blobs)
    assert freed(report, "directory")[0] == len(gone_dirs)
    assert freed(report, "chunk") == (len(gone_chunks), chunk_bytes)
    for d in gone_blobs:
        assert not (blob_root / blob_index_key(B3Digest(d))).exists()
    for d in gone_chunks:
        assert not (blob_root / chunk_key(B3Digest(d))).exists()
    for d in keep_blobs:
        assert (blob_root / blob_index_key(B3Digest(d))).exists()

    # What stays is whole, and a second run has nothing left to do.
    again = gc_json(store, "--grace", "0s")
    assert again["freed"] == 0
    assert nixcas("fsck", "--check-contents", "--check-nar", store=store).returncode == 0
    for info, src in ((a, trees["a"]), (c, trees["c"])):
        dumped = dump_path(store, str(info.store_path))
        if NIX_STORE is not None:
            assert dumped == run_nix([NIX_STORE, "--dump", str(src)], tmp_path, binary=True)
    text = nixcas("gc", "--grace", "0s", store=store)
    assert text.returncode == 0 and "blobs" in text.stdout and "freed        0" in text.stdout


async def test_grace_period_keeps_young_objects(tmp_path: Path, trees: dict[str, Path]) -> None:
    store = tmp_path / "store"
    _, b = await import_all(store, [trees["a"], trees["b"]])
    assert nixcas("delete", str(b.store_path), store=store).returncode == 0
    young = gc_json(store)  # default grace: 1h
    assert young["freed"] == 0 and young["kinds"]["blob"]["young"] > 0  # type: ignore[index]

    backdate(store, 2 * 3600)
    assert gc_json(store, "--grace", "3h")["freed"] == 0
    assert gc_json(store, "--grace", "90m", "--dry-run")["freed"] > 0  # type: ignore[operator]
    report = gc_json(store, "--grace", "1h")
    assert freed(report, "blob")[0] > 0 and freed(report, "directory")[0] > 0


async def test_reput_makes_an_old_object_young(tmp_path: Path) -> None:
    store = tmp_path / "store"
    small, big = b"small blob\n", os.urandom((1 << 20) + 100)
    child = Directory([(b"f", FileNode(B3Digest(blake3.blake3(small).digest()), len(small)))])
    async with await Store.open(store) as s:
        for data in (small, big, b"other"):
            await s.blobs.put(data)
        await s.directories.put(child)
    backdate(store, 2 * 3600)
    async with await Store.open(store) as s:
        await s.blobs.put(small)  # already stored: the put refreshes it
        writer = await s.blobs.open_write()  # the streaming path re-writes it
        async with writer:
            for i in range(0, len(big), 65536):
                await writer.write(big[i : i + 65536])
            await writer.close()
        await s.directories.put(child)
    report = gc_json(store, "--grace", "1h")
    assert freed(report, "blob")[0] == 1 and freed(report, "directory")[0] == 0  # only b"other"
    async with await Store.open(store) as s:
        assert await s.read_blob(B3Digest(blake3.blake3(small).digest())) == small
        assert await s.blobs.has(B3Digest(blake3.blake3(big).digest()))
        assert not await s.blobs.has(B3Digest(blake3.blake3(b"other").digest()))
        assert await s.directories.get(child.digest) == child


async def test_chunked_blobs_keep_shared_chunks(tmp_path: Path) -> None:
    store = tmp_path / "store"
    c1, c2, c3, c4 = (bytes([i]) * 5000 + os.urandom(100) for i in range(4))
    blob_root = store / "blobs"
    blob_root.mkdir(parents=True)
    x = write_chunked(blob_root, [c1, c2])  # pinned
    y = write_chunked(blob_root, [c2, c3])  # garbage: c3 goes, c2 stays (x uses it)
    tree = Directory([(b"x", FileNode(x, len(c1) + len(c2)))])
    async with await Store.open(store) as s:
        await s.directories.put(tree)
    assert nixcas("castore", "pin", "keep", tree.digest.hex(), store=store).returncode == 0
    backdate(store, 3600)
    z = write_chunked(blob_root, [c4, c3])  # a young blob keeps its chunks, even the old c3
    report = gc_json(store, "--grace", "30m")
    assert freed(report, "blob")[0] == 1  # y
    assert freed(report, "chunk")[0] == 0  # c3 is listed by the young z
    assert not (blob_root / blob_index_key(y)).exists()
    (blob_root / blob_index_key(z)).unlink()
    backdate(store, 3600)
    report = gc_json(store, "--grace", "30m")
    assert freed(report, "chunk")[0] == 2  # c3 and c4: no blob lists them any more
    for part, present in ((c1, True), (c2, True), (c3, False), (c4, False)):
        assert (blob_root / chunk_key(B3Digest(blake3.blake3(part).digest()))).exists() is present
    async with await Store.open(store) as s:
        assert await s.read_blob(x) == c1 + c2
    assert nixcas("castore", "unpin", "keep", store=store).returncode == 0
    backdate(store, 3600)
    report = gc_json(store, "--grace", "30m")
    assert freed(report, "blob")[0] == 1 and freed(report, "chunk")[0] == 2 and freed(report, "directory")[0] == 1


async def test_writers_that_dedup_chunks_refresh_them(tmp_path: Path) -> None:
    """A chunk a new blob reuses is made young, so a GC whose cutoff predates the write keeps it."""
    store = tmp_path / "store"
    first = os.urandom(3 << 20)
    second = first[: 2 << 20] + os.urandom(1 << 20)  # shares its leading chunks with ``first``
    async with await Store.open(store) as s:
        d1 = await s.blobs.put(first)
        assert isinstance(s.blobs, LocalBlobService)
        chunks1 = await s.blobs.chunks(d1)
        assert chunks1 is not None and len(chunks1) > 2
    backdate(store, 2 * 3600)
    before = time.time_ns() - 10**9
    async with await Store.open(store) as s:
        assert isinstance(s.blobs, LocalBlobService)
        writer = await s.blobs.open_write()  # the streaming writer
        async with writer:
            for i in range(0, len(second), 65536):
                await writer.write(second[i : i + 65536])
            d2 = await writer.close()
        chunks2 = await s.blobs.chunks(d2)
        assert chunks2 is not None
        shared = {c.digest for c in chunks1} & {c.digest for c in chunks2}
        assert shared  # content-defined chunking found the common prefix
        for digest in shared:
            assert (store / "blobs" / chunk_key(digest)).stat().st_mtime_ns >= before
        # missing_chunks (the chunk-level copy) refreshes what it finds present, too
        backdate(store, 2 * 3600)
        assert await s.blobs.missing_chunks(chunks1) == []
        for c in chunks1:
            assert (store / "blobs" / chunk_key(c.digest)).stat().st_mtime_ns >= before
    # Both blobs are old garbage now; the chunks just refreshed stay, ``second``'s own chunks go.
    report = gc_json(store, "--grace", "1h")
    own = {c.digest for c in chunks2} - {c.digest for c in chunks1}
    assert freed(report, "blob")[0] == 2 and freed(report, "chunk")[0] == len(own) > 0
    for c in chunks1:
        assert (store / "blobs" / chunk_key(c.digest)).exists()


@pytest.mark.parametrize("gc_started", ["before the upload", "during the upload"])
async def test_a_streaming_upload_without_lease_never_publishes_a_broken_blob(tmp_path: Path, gc_started: str) -> None:
    """A daemon upload holds no lease: GC may run while it reuses old chunks. It must not end up corrupt."""
    blobs = LocalBlobService(str(tmp_path / "blobs"))
    old = os.urandom(3 << 20)
    await blobs.put(old)
    backdate(tmp_path, 2 * 3600, directories=False)
    new = old[: 2 << 20] + os.urandom(1 << 20)  # reuses the old blob's leading chunks
    cutoff = time.time_ns()  # ``gc --grace 0s`` fixing its cutoff now ...
    await asyncio.sleep(0.05)  # (file times come from a coarser clock than time_ns)
    writer = await blobs.open_write()
    async with writer:
        await writer.write(new[: 2 << 20])
        if gc_started == "during the upload":
            await asyncio.sleep(0.05)
            cutoff = time.time_ns()  # ... or only now, after the reused chunks were found and refreshed
        report = await collect(blobs, MemoryDirectoryService(SizeRule.TVIX), [], cutoff_ns=cutoff)
        await writer.write(new[2 << 20 :])
        if gc_started == "before the upload":  # the reused chunks were young for that GC: all is well
            assert report.kinds["blob"].freed == 1  # the old blob, and its chunks the new one does not share
            digest = await writer.close()
            assert await blobs.read(digest) == new
        else:  # that GC deleted them (nothing referred to them): the upload fails, nothing is published
            assert report.kinds["chunk"].freed > 0
            with pytest.raises(StorageError, match="deleted while it ran"):
                await writer.close()
            assert not await blobs.has(B3Digest(blake3.blake3(new).digest()))
    await blobs.close()


async def test_a_long_upload_keeps_its_staged_chunks_young(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nixcas.castore.objectstore.writers as local

    monkeypatch.setattr(local, "KEEP_ALIVE_SECONDS", 0.0)  # refresh on every write
    blobs = LocalBlobService(str(tmp_path / "blobs"))
    data = os.urandom(3 << 20)
    writer = await blobs.open_write()
    async with writer:
        await writer.write(data[: 2 << 20])
        staged = [p for p in (tmp_path / "blobs" / "tmp").iterdir()]
        assert staged
        for p in staged:  # as if the upload had been running for two hours
            os.utime(p, ns=(0, time.time_ns() - 2 * HOUR_NS))
        await writer.write(data[2 << 20 :])  # ... and it goes on: its staged files are refreshed
        assert await blobs.sweep_temporary(time.time_ns() - 60 * 10**9, dry_run=False) == []
        assert await blobs.read(await writer.close()) == data
    writer = await blobs.open_write()
    async with writer:
        await writer.write(os.urandom(2 << 20))
        for p in (tmp_path / "blobs" / "tmp").iterdir():
            p.unlink()  # what a collection does to a stray temp file
        with pytest.raises(StorageError, match="staged chunk of this upload was removed"):
            await writer.close()
    await blobs.close()


async def test_outboards_are_collected_with_their_blob(tmp_path: Path) -> None:
    store = tmp_path / "store"
    kept, dropped = os.urandom(600_000), os.urandom(700_000)
    async with await Store.open(store) as s:
        keep, drop = await s.blobs.put(kept), await s.blobs.put(dropped)
        assert await s.blobs.outboard(keep) is not None and await s.blobs.outboard(drop) is not None
    bao_files = {d: store / "blobs" / "bao" / "b3" / d.hex()[:4] / d.hex() for d in (keep, drop)}
    assert all(p.exists() for p in bao_files.values())
    assert nixcas("castore", "pin", "keep", keep.hex(), store=store).returncode == 0
    backdate(store, 2 * 3600)
    report = gc_json(store, "--grace", "1h")
    assert freed(report, "outboard")[0] == 1 and freed(report, "blob")[0] == 1
    assert bao_files[keep].exists() and not bao_files[drop].exists()


async def test_memory_backends_collect(tmp_path: Path) -> None:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    keep = await blobs.put(b"keep")
    drop = await blobs.put(b"drop")
    tree = Directory([(b"k", FileNode(keep, 4))])
    await dirs.put(tree)
    await dirs.put(Directory([(b"d", FileNode(drop, 4))]))
    report = await collect(blobs, dirs, [tree.digest], cutoff_ns=time.time_ns())
    assert report.kinds["blob"].freed == 1 and report.kinds["directory"].freed == 1
    assert await blobs.has(keep) and not await blobs.has(drop)
    assert (await collect(blobs, dirs, [], cutoff_ns=0)).freed == 0  # nothing is older than 0


def test_lease_protects_a_running_writer(tmp_path: Path) -> None:
    store = tmp_path / "store"
    leases = WriteLeases(store / "leases")
    with leases.hold():
        time.sleep(0.02)
        asyncio.run(put_blob(store, b"written under a lease"))
        report = gc_json(store, "--grace", "0s")
        assert report["freed"] == 0 and report["kinds"]["blob"]["young"] == 1  # type: ignore[index]
    assert freed(gc_json(store, "--grace", "0s"), "blob")[0] == 1
    # A lease file nobody holds (its writer died) protects nothing and is removed.
    (store / "leases" / "12345.dead").touch()
    asyncio.run(put_blob(store, b"another"))
    assert freed(gc_json(store, "--grace", "0s"), "blob")[0] == 1
    assert not (store / "leases" / "12345.dead").exists()


async def put_blob(store: Path, data: bytes, *, object_layout: bool = False) -> B3Digest:
    url = f"objectstore+file://{store.absolute() / 'blobs'}" if object_layout else None
    async with await Store.open(store, blob_service_url=url) as s:
        return await s.blobs.put(data)


def test_parse_duration() -> None:
    assert parse_duration("0s") == 0
    assert parse_duration("30m") == 1800 * 10**9
    assert parse_duration("1h") == 3600 * 10**9
    assert parse_duration("1h30m") == 5400 * 10**9
    assert parse_duration("2d") == 2 * 86400 * 10**9
    assert parse_duration("45") == 45 * 10**9
    for bad in ("", "1x", "-1s", "h", "1.5h", "1h 2m"):
        with pytest.raises(ConfigurationError):
            parse_duration(bad)


def test_gc_bad_input(tmp_path: Path) -> None:
    store = tmp_path / "store"
    one_line_error(nixcas("gc", "--grace", "soon", store=store), 2, "invalid duration 'soon'")
    one_line_error(
        nixcas("--blob-service-addr", "grpc+http://127.0.0.1:1", "gc", store=store),
        2,
        "garbage collection works on the store's own backends",
    )
    one_line_error(
        nixcas("--directory-service-addr", "lru://?capacity=10", "gc", store=store),
        2,
        "run it where the directories are stored",
    )
    one_line_error(
        nixcas(
            "--path-info-service-addr",
            "grpc+http://127.0.0.1:1",
            "delete",
            "/nix/store/" + "a" * 32 + "-x",
            store=store,
        ),
        2,
        "cannot delete path infos",
    )


async def test_delete_refuses_referenced_paths(tmp_path: Path, trees: dict[str, Path]) -> None:
    store = tmp_path / "store"
    a, b, c = await import_all(store, [trees["a"], trees["b"], trees["c"]])
    async with await Store.open(store, with_pathinfo=True) as s:
        assert s.pathinfos is not None
        # c refers to a and to itself
        await s.pathinfos.put(c.replace(references=(a.store_path, c.store_path), ca=None))
    refused = nixcas("delete", str(b.store_path), str(a.store_path), store=store)
    one_line_error(refused, 1, f"{a.store_path} is still referenced by {c.store_path}; use --force")
    assert nixcas("path-info", str(b.store_path), store=store).returncode == 0  # nothing was deleted
    assert nixcas("delete", str(a.store_path), str(c.store_path), store=store).returncode == 0  # both go together
    one_line_error(nixcas("delete", str(a.store_path), store=store), 1, "not in the store")
    one_line_error(nixcas("delete", "/nix/store/nonsense", store=store), 2, "Invalid value")
    forced = nixcas("delete", "--force", str(b.store_path), store=store)
    assert forced.returncode == 0
    one_line_error(nixcas("path-info", str(b.store_path), store=store), 1, "not in the store")


def test_pins(tmp_path: Path, trees: dict[str, Path]) -> None:
    store = tmp_path / "store"
    ingested = nixcas("castore", "ingest", str(trees["a"]), "--json", "--pin", "a", store=store)
    assert ingested.returncode == 0, ingested.stderr
    a_root = json.loads(ingested.stdout)["digest"]
    b_root = json.loads(nixcas("castore", "ingest", str(trees["b"]), "--json", store=store).stdout)["digest"]
    assert nixcas("castore", "pin", "b", b_root, store=store).returncode == 0
    listed = nixcas("castore", "pins", "--json", store=store).stdout.splitlines()
    assert [json.loads(line)["name"] for line in listed] == ["a", "b"]
    assert json.loads(listed[1])["digest"] == b_root
    assert gc_json(store, "--grace", "0s")["freed"] == 0
    assert nixcas("castore", "unpin", "b", store=store).returncode == 0
    report = gc_json(store, "--grace", "0s")
    assert freed(report, "directory")[0] == len(subtrees(trees["b"]) - subtrees(trees["a"]))
    assert nixcas("castore", "ls", "-r", a_root, store=store).returncode == 0
    assert nixcas("castore", "ls", b_root, store=store).returncode == 1

    single = tmp_path / "single-file"
    single.write_bytes(b"a pinned blob\n")
    pinned = nixcas("castore", "ingest", str(single), "--json", "--pin", "blob", store=store)
    assert json.loads(pinned.stdout)["type"] == "file"
    backdate(store, 3600)
    report = gc_json(store, "--grace", "0s")
    assert report["freed"] == 0 and report["missing_directories"] == 0, report["kinds"]  # a pinned blob is a blob root
    assert nixcas("castore", "cat", json.loads(pinned.stdout)["digest"], store=store).stdout == "a pinned blob\n"

    one_line_error(nixcas("castore", "unpin", "b", store=store), 1, "no pin named 'b'")
    one_line_error(nixcas("castore", "pin", "gone", b_root, store=store), 1, "no such directory or blob")
    one_line_error(nixcas("castore", "pin", "bad name", a_root, store=store), 2, "contains ' '")
    one_line_error(nixcas("castore", "pin", "x", "nothex", store=store), 2, "cannot parse digest 'nothex'")
    one_line_error(
        nixcas("castore", "ingest", str(trees["a"]), "--pin", "", store=store), 2, "pin name must be 1 to 255"
    )


OLD_SCHEMA = """
CREATE TABLE directories (
    digest BLOB PRIMARY KEY NOT NULL CHECK (length(digest) = 32),
    data   BLOB NOT NULL
) WITHOUT ROWID;
"""


async def test_directory_database_migration(tmp_path: Path) -> None:
    path = tmp_path / "directories.sqlite"
    old = Directory([(b"f", FileNode(EMPTY_DIGEST, 0))])
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
        conn.execute("INSERT INTO directories (digest, data) VALUES (?, ?)", (old.digest, old.encode()))
    conn.close()
    before = time.time_ns()
    service = SqliteDirectoryService(str(path))
    try:
        assert await service.get(old.digest) == old
        stored = [o async for batch in service.scan_directories() for o in batch]
        assert [o.digest for o in stored] == [old.digest] and stored[0].mtime_ns >= before
        new = Directory([(b"sub", old.node(SizeRule.TVIX))])
        await service.put(new)
        report = await collect(
            LocalBlobService(tmp_path / "blobs"), service, [new.digest], cutoff_ns=time.time_ns() + HOUR_NS
        )
        assert report.kinds["directory"].live == 2 and report.kinds["directory"].freed == 0
    finally:
        await service.close()
    with sqlite3.connect(path) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(directories)")]
    conn.close()
    assert columns == ["digest", "data", "mtime"]
    again = SqliteDirectoryService(str(path))  # opening a migrated database changes nothing
    await again.close()


IMPORTER = """
import asyncio, sys, time
from pathlib import Path
from nixcas.api import Store
from nixcas.castore.gc import WriteLeases
from nixcas.store.importer import Services, import_path
from nixcas.store.gc import delete_paths

async def main(store_dir, seconds, trees):
    async with await Store.open(store_dir, with_pathinfo=True) as store:
        svc = Services(store.blobs, store.directories, store.pathinfos, store.nar_calculation())
        previous = None
        i = 0
        deadline = time.monotonic() + float(seconds)
        while i < len(trees) or time.monotonic() < deadline:
            with WriteLeases(Path(store_dir) / "leases").hold():
                info = await import_path(trees[i % len(trees)], svc)
            if previous is not None and i % 3 != 1 and previous.store_path != info.store_path:
                await delete_paths(store.pathinfos, [previous.store_path])
            previous = info
            i += 1
        async for info in store.pathinfos.list():
            print(info.store_path)
    print(i, file=sys.stderr)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
"""


def test_gc_concurrent_with_imports_never_breaks_a_path(tmp_path: Path) -> None:
    store = tmp_path / "store"
    rounds = 30
    sources = []
    for i in range(rounds):  # each tree shares most files with the one before, which is deleted meanwhile
        spec: dict[str, bytes | dict[str, object]] = {
            "lib": {f"f{j}": f"file {j} of generation {(i + j) // 4}\n".encode() for j in range(12)},
            "big": (b"%d" % (i // 2)) * 300_000,
            "own": f"tree {i}\n".encode(),
        }
        sources.append(write_tree(tmp_path / "src" / f"t{i}", spec))
    gc_log = tmp_path / "gc.log"
    with open(gc_log, "w") as log:
        collector = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, subprocess\n"
                "while True:\n"
                "    r = subprocess.run([sys.executable, '-m', 'nixcas.cli.main', '--store-dir', sys.argv[1],"
                " 'gc', '--grace', '0s', '--json'], capture_output=True, text=True)\n"
                "    print(r.returncode, r.stdout.strip(), r.stderr.strip(), sep='\\t', flush=True)\n",
                str(store),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            importer = subprocess.run(
                [sys.executable, "-c", IMPORTER, str(store), "8", *map(str, sources)],
                capture_output=True,
                text=True,
                timeout=240,
                check=False,
            )
        finally:
            collector.kill()
            collector.wait()
    assert importer.returncode == 0, importer.stderr
    runs = [line.split("\t") for line in gc_log.read_text().splitlines() if line]
    assert len(runs) >= 3 and all(r[0] == "0" for r in runs), gc_log.read_text()[-2000:]
    assert sum(json.loads(r[1])["freed"] for r in runs) > 0  # the collector really collected meanwhile
    kept = importer.stdout.split()
    assert len(kept) >= rounds // 3
    by_name = {p.name: p for p in sources}
    for store_path in kept:
        dumped = dump_path(store, store_path)
        if NIX_STORE is not None:
            src = by_name[store_path.split("-", 1)[1]]
            assert dumped == run_nix([NIX_STORE, "--dump", str(src)], tmp_path, binary=True)
    final = gc_json(store, "--grace", "0s")
    assert final["missing_directories"] == 0
    assert nixcas("fsck", "--check-contents", "--check-nar", store=store).returncode == 0


def test_temporary_files_and_interrupted_deletions(tmp_path: Path) -> None:
    store = tmp_path / "store"
    digest = asyncio.run(put_blob(store, b"kept by a pin\n", object_layout=True))
    assert nixcas("castore", "pin", "p", digest.hex(), store=store).returncode == 0
    tmp = store / "blobs" / "tmp"
    stale, fresh = tmp / "123.abc.7", tmp / "123.abc.8"
    stale.write_bytes(b"x" * 10)
    fresh.write_bytes(b"y")
    os.utime(stale, ns=(0, time.time_ns() - 2 * HOUR_NS))
    # A collection that died between moving a chunk aside and deleting it:
    chunk = store / "blobs" / chunk_key(digest)
    moved = tmp / f"gc.999.abcdef.0.chunks.{digest.hex()}"
    chunk.rename(moved)
    report = gc_json(store, "--grace", "1h")
    assert freed(report, "temporary") == (1, 10)
    assert not stale.exists() and fresh.exists() and not moved.exists() and chunk.exists()
    assert nixcas("castore", "cat", digest.hex(), store=store).stdout == "kept by a pin\n"
    assert nixcas("fsck", "--check-contents", store=store).returncode == 0


def test_one_collection_at_a_time(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with WriteLeases(store / "leases").collecting():
        one_line_error(nixcas("gc", store=store), 1, "another garbage collection is running on this store")
    assert nixcas("gc", store=store).returncode == 0


@pytest.fixture(params=["memory", "objectstore+file", "packed"])
def sweepable_blobs(request: pytest.FixtureRequest, tmp_path: Path) -> MemoryBlobService | LocalBlobService:
    if request.param == "packed":
        return PackedBlobService(tmp_path / "blobs")
    return MemoryBlobService() if request.param == "memory" else LocalBlobService(tmp_path / "blobs")


async def scan_all(scan: AsyncIterator[list[StoredObject]]) -> dict[B3Digest, StoredObject]:
    return {o.digest: o async for batch in scan for o in batch}


async def test_sweepable_blob_contract(sweepable_blobs: MemoryBlobService | LocalBlobService) -> None:
    blobs = sweepable_blobs
    before = time.time_ns() - 10**9  # filesystem clocks are coarse
    small, big = b"a small blob", os.urandom(3 << 20)
    digests = [await blobs.put(small), await blobs.put(big)]
    stored = await scan_all(blobs.scan_blobs())
    assert set(stored) == set(digests) and all(o.mtime_ns >= before for o in stored.values())

    kept = await blobs.delete_blobs(list(stored.values()), before)  # younger than the cutoff: kept
    assert kept.deleted == [] and len(kept.kept) == 2 and all([await blobs.has(d) for d in digests])

    old = stored[digests[0]].mtime_ns
    await asyncio.sleep(0.05)
    await blobs.put(small)  # a re-put refreshes the age
    assert (await scan_all(blobs.scan_blobs()))[digests[0]].mtime_ns > old

    now = time.time_ns() + 10**9
    gone = await blobs.delete_blobs(list(stored.values()), now)
    assert len(gone.deleted) == 2 and gone.kept == []
    chunks = list((await scan_all(blobs.scan_chunks())).values())
    assert len((await blobs.delete_chunks(chunks, now)).deleted) == len(chunks)
    assert not any([await blobs.has(d) for d in digests])
    again = await blobs.delete_blobs(list(stored.values()), now)  # already gone: success, nothing counted
    assert again.deleted == [] and again.kept == []
    assert await blobs.put(small) == digests[0] and await blobs.read(digests[0]) == small  # and it can come back


@pytest.fixture(params=["memory", "sqlite"])
async def sweepable_dirs(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[MemoryDirectoryService | SqliteDirectoryService]:
    service = (
        MemoryDirectoryService(SizeRule.TVIX)
        if request.param == "memory"
        else SqliteDirectoryService(str(tmp_path / "d.db"))
    )
    yield service
    await service.close()


async def test_sweepable_directory_contract(sweepable_dirs: MemoryDirectoryService | SqliteDirectoryService) -> None:
    dirs = sweepable_dirs
    leaf = Directory([(b"f", FileNode(EMPTY_DIGEST, 0))])
    top = Directory([(b"leaf", leaf.node(SizeRule.TVIX))])
    before = time.time_ns()
    await dirs.put(leaf)
    await dirs.put(top)
    stored = await scan_all(dirs.scan_directories())
    assert set(stored) == {leaf.digest, top.digest}
    assert stored[leaf.digest].size == len(leaf.encode()) and stored[leaf.digest].mtime_ns >= before
    assert len((await dirs.delete_directories(list(stored.values()), before)).kept) == 2
    await asyncio.sleep(0.01)
    await dirs.put(leaf)
    assert (await scan_all(dirs.scan_directories()))[leaf.digest].mtime_ns > stored[leaf.digest].mtime_ns
    cutoff = time.time_ns() + 1
    done = await dirs.delete_directories([stored[top.digest]], cutoff)
    assert done.deleted == [stored[top.digest]] and await dirs.get(top.digest) is None
    assert await dirs.get(leaf.digest) == leaf
    again = await dirs.delete_directories([stored[top.digest]], cutoff)
    assert again.deleted == [] and again.kept == []


class _ReputBeforeDelete(LocalBlobService):
    """Re-puts chosen blobs after the sweep's scan saw them old, just before it deletes them."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reput: list[bytes] = []

    async def delete_blobs(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        for data in self.reput:
            await self.put(data)
        return await super().delete_blobs(objects, cutoff_ns)

    async def delete_chunks(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        for data in self.reput:
            await self.put(data)
        return await super().delete_chunks(objects, cutoff_ns)


async def test_objects_written_or_reput_while_gc_runs_survive(tmp_path: Path) -> None:
    blobs = _ReputBeforeDelete(tmp_path / "blobs")
    dirs = SqliteDirectoryService(str(tmp_path / "directories.sqlite"))
    try:
        old, doomed = b"old, re-put during the sweep", b"old and unreferenced"
        await blobs.put(old)
        await blobs.put(doomed)
        for p in (tmp_path / "blobs").rglob("*"):
            if p.is_file():
                os.utime(p, ns=(0, time.time_ns() - HOUR_NS))
        new_dir = Directory([(b"n", FileNode(B3Digest(blake3.blake3(b"new").digest()), 3))])
        cutoff = WriteLeases(tmp_path / "leases").cutoff_ns(0)  # the collection starts
        new = await blobs.put(b"new")  # written after its cutoff was fixed, referenced by nothing
        await dirs.put(new_dir)
        blobs.reput = [old]  # re-put after the scan found it old, before the deletion
        report = await collect(blobs, dirs, [], cutoff_ns=cutoff)
        assert report.kinds["blob"].freed == 1 and report.kinds["blob"].young == 2  # only the doomed one goes
        assert report.kinds["directory"].freed == 0
        assert await blobs.read(B3Digest(blake3.blake3(old).digest())) == old
        assert await blobs.read(new) == b"new"
        assert await dirs.get(new_dir.digest) == new_dir
        assert not await blobs.has(B3Digest(blake3.blake3(doomed).digest()))
    finally:
        await dirs.close()
