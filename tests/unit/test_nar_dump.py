"""``dump_nar``: the NAR written straight to a descriptor, in batches read on worker threads (``nixcas dump-path``).

Its bytes are compared with :func:`render_nar`'s (itself checked against hand-built vectors and real Nix
in ``test_nar.py`` and ``test_nix_compat.py``); damage must leave a verified prefix and a precise error.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import blake3
import pytest
import zstandard

from nixcas._proto.tvix.castore.protos import castore_pb2 as pb
from nixcas.castore.blob.base import BlobService
from nixcas.castore.blob.local import LocalBlobService, raw_blocks
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.blob.packed import STORE_LEVEL, PackedBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.ingest import ingest_path
from nixcas.castore.nodes import DirectoryNode, Node
from nixcas.errors import ChecksumMismatch, DirectoryError, InvalidNameError, StorageError
from nixcas.store.nar import dump as dump_module
from nixcas.store.nar import rawplan
from nixcas.store.nar.dump import dump_nar, write_all
from nixcas.store.nar.plan import NarContentNotFound
from nixcas.store.nar.rawplan import plan_nar
from nixcas.store.nar.render import render_nar
from nixcas.testing import packed

BIG = 3 << 20  # several chunks


def write_tree(root: Path) -> dict[str, bytes]:
    """A tree with every kind of entry; the contents of its files by path."""
    rng = random.Random(15)  # noqa: S311
    files = {f"d{i // 40}/f{i:03d}": rng.randbytes(rng.randint(1, 3000)) for i in range(120)}
    files["a/same-1"] = files["a/same-2"] = b"the same blob twice\n"
    files["a/empty"] = b""
    files["a/exe"] = b"#!/bin/sh\n"
    files["m/medium"] = rng.randbytes(300 << 10)  # above the packs' limit: a chunked blob
    files["m/big"] = rng.randbytes(BIG)
    files["m/big-copy"] = files["m/big"]
    files["z/last"] = b"after the big ones"
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "a/exe").chmod(0o755)
    (root / "a/link").symlink_to("exe")
    (root / "empty-dir").mkdir()
    return files


@pytest.fixture(params=["packed", "packed-compressed", "objectstore", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[BlobService, Path]]:
    root = tmp_path / "blobs"
    blobs: BlobService
    if request.param == "memory":
        blobs = MemoryBlobService()
    elif request.param == "objectstore":
        blobs = LocalBlobService(root)
    else:
        blobs = PackedBlobService(root, compress=request.param == "packed-compressed")
    yield blobs, root
    await blobs.close()


async def tree_in(tmp_path: Path, blobs: BlobService) -> tuple[Node, DirectoryService, bytes]:
    write_tree(tmp_path / "tree")
    directories = MemoryDirectoryService()
    node = await ingest_path(tmp_path / "tree", blobs, directories)
    nar = b"".join([chunk async for chunk in render_nar(node, blobs, directories)])
    return node, directories, nar


async def packed_plan(tmp_path: Path) -> tuple[Path, rawplan.Plan, bytes]:
    """The tree imported into a packed store at ``tmp_path / "blobs"`` (closed again): that directory, the
    raw plan of its NAR, and the NAR."""
    root = tmp_path / "blobs"
    blobs = PackedBlobService(root)
    try:
        node, directories, nar = await tree_in(tmp_path, blobs)
        return root, plan_nar(node, await dump_module.fetch_raw_closure(node, directories)), nar
    finally:
        await blobs.close()


async def dump_to_file(path: Path, node: Node, blobs: BlobService, directories: DirectoryService) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return await dump_nar(fd, node, blobs, directories)
    finally:
        os.close(fd)


async def test_dump_is_the_rendered_nar(store: tuple[BlobService, Path], tmp_path: Path) -> None:
    blobs, _ = store
    node, directories, nar = await tree_in(tmp_path, blobs)
    assert (blobs.bulk_reads() is None) == isinstance(blobs, MemoryBlobService)
    out = tmp_path / "out.nar"
    assert await dump_to_file(out, node, blobs, directories) == len(nar)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(nar).digest()


async def test_small_windows_and_the_async_path_give_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny runs and window, and blobs above ``whole_max`` (streamed through the async API)."""
    blobs = PackedBlobService(tmp_path / "blobs")
    try:
        node, directories, nar = await tree_in(tmp_path, blobs)
        monkeypatch.setattr(rawplan, "RUN_FILES", 3)  # planned in small steps
        monkeypatch.setattr(dump_module, "RUN_FILES", 3)  # and read in small runs
        monkeypatch.setattr(dump_module, "WINDOW_BYTES", 10_000)
        monkeypatch.setattr(blobs, "whole_max", 1 << 20)  # the 3 MiB files go the async way
        out = tmp_path / "out.nar"
        assert await dump_to_file(out, node, blobs, directories) == len(nar)
        assert out.read_bytes() == nar
    finally:
        await blobs.close()


async def test_a_failing_batch_is_read_file_by_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blobs = PackedBlobService(tmp_path / "blobs")
    try:
        node, directories, nar = await tree_in(tmp_path, blobs)

        def broken(*args: object) -> None:
            raise RuntimeError("batch reads are broken today")

        monkeypatch.setattr(blobs, "read_run", broken)
        out = tmp_path / "out.nar"
        with caplog.at_level("WARNING", logger="nixcas.store.nar.dump"):
            await dump_to_file(out, node, blobs, directories)
        assert out.read_bytes() == nar
        assert "batch reads are broken today" in caplog.text
    finally:
        await blobs.close()


def contents_offset(nar: bytes, data: bytes) -> int:
    """Where ``data`` (unique in the NAR, preceded by its length) begins."""
    at = nar.index(len(data).to_bytes(8, "little") + data)
    return at + 8


@pytest.mark.parametrize("damaged", ["d1/f050", "m/big"])
async def test_damage_leaves_a_verified_prefix_and_a_clear_error(tmp_path: Path, damaged: str) -> None:
    root = tmp_path / "blobs"
    blobs = PackedBlobService(root)
    try:
        node, directories, nar = await tree_in(tmp_path, blobs)
        data = (tmp_path / "tree" / damaged).read_bytes()
        digest = B3Digest(blake3.blake3(data).digest())
        if len(data) <= blobs.inline_max:
            assert packed.corrupt_blob(root, digest, data[:-1] + bytes([data[-1] ^ 1]), compress=False)
        else:  # flip one byte of the last chunk object (a zstd frame of raw blocks: still a valid frame)
            chunk = (await blobs.chunks(digest) or [])[-1]
            h = chunk.digest.hex()
            path = root / "chunks" / "b3" / h[:4] / h
            stored = bytearray(path.read_bytes())
            stored[-10] ^= 1
            path.write_bytes(bytes(stored))
        out = tmp_path / "out.nar"
        with pytest.raises(ChecksumMismatch):
            await dump_to_file(out, node, blobs, directories)
        written = out.read_bytes()
        assert nar.startswith(written)  # nothing but correct bytes
        start = contents_offset(nar, data)
        assert len(written) <= start + len(data) - 1  # the damaged part was never written
        if len(data) <= blobs.inline_max:
            assert len(written) == start  # everything before the file was
    finally:
        await blobs.close()


async def test_a_missing_blob_is_named_with_its_path(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    blobs = PackedBlobService(root)
    try:
        node, directories, nar = await tree_in(tmp_path, blobs)
        data = (tmp_path / "tree" / "d2/f100").read_bytes()
        assert packed.delete_blob(root, blake3.blake3(data).digest())
        out = tmp_path / "out.nar"
        with pytest.raises(NarContentNotFound, match="/d2/f100"):
            await dump_to_file(out, node, blobs, directories)
        assert len(out.read_bytes()) == contents_offset(nar, data)
    finally:
        await blobs.close()


def test_raw_blocks() -> None:
    data = random.Random(1).randbytes(300_000)  # noqa: S311
    for checksum in (False, True):
        frame = zstandard.ZstdCompressor(level=STORE_LEVEL, write_checksum=checksum).compress(data)
        blocks = raw_blocks(memoryview(frame), 0, len(frame))
        assert blocks is not None and len(blocks) > 1
        assert b"".join(frame[o : o + n] for o, n in blocks) == data
    shifted = b"xyz" + frame
    blocks = raw_blocks(memoryview(shifted), 3, len(shifted))
    assert blocks is not None and b"".join(shifted[o : o + n] for o, n in blocks) == data
    compressed = zstandard.ZstdCompressor(level=3).compress(b"abc" * 100_000)
    assert raw_blocks(memoryview(compressed), 0, len(compressed)) is None  # zstd decodes it
    assert raw_blocks(memoryview(frame), 0, len(frame) - 1) is None  # cut short
    assert raw_blocks(memoryview(frame + b"\0"), 0, len(frame) + 1) is None  # trailing bytes
    assert raw_blocks(memoryview(b"not a frame at all"), 0, 18) is None


def stored_directory(**lists: list[tuple[bytes, bytes]]) -> tuple[DirectoryNode, dict[bytes, bytes]]:
    """Raw Directory bytes as a damaged store could hold them (never validated)."""
    msg = pb.Directory()
    for name, digest in lists.get("files", []):
        msg.files.add(name=name, digest=digest, size=1)
    for name, target in lists.get("symlinks", []):
        msg.symlinks.add(name=name, target=target)
    raw = msg.SerializeToString()
    digest = B3Digest(blake3.blake3(raw).digest())
    return DirectoryNode(digest, 1), {digest: raw}


def test_plan_checks_stored_directories() -> None:
    one = B3Digest(blake3.blake3(b"x").digest())
    node, closure = stored_directory(files=[(b"a", one), (b"b", one)], symlinks=[(b"c", b"a")])
    plan = plan_nar(node, closure)
    assert len(plan.digests) == 2 and plan.paths[1] is not None and plan.paths[1][1] == b"b"
    for bad, error in (
        ({"files": [(b"b", one), (b"a", one)]}, DirectoryError),  # not sorted
        ({"files": [(b"a", one)], "symlinks": [(b"a", b"x")]}, DirectoryError),  # a name twice
        ({"files": [(b"a/b", one)]}, InvalidNameError),
        ({"files": [(b"..", one)]}, InvalidNameError),
        ({"files": [(b"a", b"short")]}, DirectoryError),
        ({"symlinks": [(b"a", b"")]}, DirectoryError),
    ):
        node, closure = stored_directory(**bad)
        with pytest.raises(error):
            plan_nar(node, closure)
    with pytest.raises(NarContentNotFound):
        plan_nar(node, {})


def test_write_all_into_a_slow_non_blocking_pipe() -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    pieces = [os.urandom(n) for n in (1, 100_000, 70_000, 3, 1 << 20)] * 3
    got = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 10_000):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        write_all(w, [memoryview(p) if i % 2 else p for i, p in enumerate(pieces)])
    finally:
        os.close(w)
        reader.join()
        os.close(r)
    assert bytes(got) == b"".join(pieces)


async def test_a_damaged_pack_file_is_an_error_not_a_crash(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    blobs = PackedBlobService(root)
    try:
        node, directories, nar = await tree_in(tmp_path, blobs)
        for pack in (root / "packs").iterdir():
            os.truncate(pack, pack.stat().st_size // 2)
        with pytest.raises(StorageError):
            await dump_to_file(tmp_path / "out.nar", node, blobs, directories)
        assert nar.startswith((tmp_path / "out.nar").read_bytes())
    finally:
        await blobs.close()


async def test_repeated_dumps_reuse_the_workers_and_their_connections(tmp_path: Path) -> None:
    """A process that dumps again and again (a library caller) does not open a database connection per dump."""
    blobs = PackedBlobService(tmp_path / "blobs")
    try:
        node, directories, nar = await tree_in(tmp_path, blobs)
        out = tmp_path / "out.nar"
        await dump_to_file(out, node, blobs, directories)
        # A connection belongs to a thread that read the store (worker and executor threads live on, and
        # an executor may start more of them under load, up to its bound); more dumps than threads then
        # tell one connection per thread from one per dump.
        for _ in range(threading.active_count() + dump_module.WORKERS + 2):
            await dump_to_file(out, node, blobs, directories)
        assert len(blobs._connections) <= threading.active_count()
        assert out.read_bytes() == nar
    finally:
        await blobs.close()


async def test_the_plan_is_the_same_without_protobuf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Directories read as canonical fields (the fast path, protobuf not loaded) give the plan protobuf gives,
    and refuse the same damaged directories with the same errors."""
    blobs = MemoryBlobService()
    node, directories, _ = await tree_in(tmp_path, blobs)
    closure = await dump_module.fetch_raw_closure(node, directories)
    with_protobuf = plan_nar(node, closure)
    monkeypatch.setattr(rawplan, "_protobuf_loaded", lambda: False)
    without = plan_nar(node, closure)
    assert (without.frames, without.digests, without.sizes) == (
        with_protobuf.frames,
        with_protobuf.digests,
        with_protobuf.sizes,
    )
    one = B3Digest(blake3.blake3(b"x").digest())
    for bad in (
        {"files": [(b"b", one), (b"a", one)]},
        {"files": [(b"a", one)], "symlinks": [(b"a", b"x")]},
        {"files": [(b"a/b", one)]},
        {"files": [(b"a", b"short")]},
        {"symlinks": [(b"a", b"")]},
    ):
        errors = []
        for loaded in (False, True):
            monkeypatch.setattr(rawplan, "_protobuf_loaded", lambda loaded=loaded: loaded)
            bad_node, bad_closure = stored_directory(**bad)
            with pytest.raises((DirectoryError, InvalidNameError)) as info:
                plan_nar(bad_node, bad_closure)
            errors.append((type(info.value), str(info.value)))
        assert errors[0] == errors[1], bad


def test_output_leaves_out_what_was_written_before(tmp_path: Path) -> None:
    pieces: list[bytes | memoryview] = [b"0123", memoryview(b"4567"), b"89", b"abcdef"]
    for skip in (0, 3, 4, 9, 10, 16):
        path = tmp_path / f"out-{skip}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT)
        out = dump_module.Output(fd, skip)
        out.write(pieces[:2])
        out.write(pieces[2:])
        os.close(fd)
        assert path.read_bytes() == b"0123456789abcdef"[skip:]
        assert out.position == 16


def test_a_blob_index_is_read_without_protobuf() -> None:
    from nixcas.castore.blob import chunking, wholeread
    from nixcas.castore.blob.base import ChunkMeta
    from nixcas.castore.objectstore.layout import decode_index, encode_index

    rng = random.Random(7)  # noqa: S311
    for sizes in ([1, 1], [5, 1 << 20, 127, 128, 300_000], [(1 << 26) - 1, 1 << 26]):
        chunks = [ChunkMeta(B3Digest(rng.randbytes(32)), size) for size in sizes]
        data = encode_index(chunks)
        assert wholeread.parse_index(data) == [(bytes(c.digest), c.size) for c in chunks]
        for i in range(len(data)):  # any other bytes: refused here, or read as protobuf reads them
            mutated = bytearray(data)
            mutated[i] ^= 1 << rng.randrange(8)
            parsed = wholeread.parse_index(bytes(mutated))
            if parsed is not None:
                assert parsed == [(bytes(c.digest), c.size) for c in decode_index(B3Digest(bytes(32)), bytes(mutated))]
        assert wholeread.parse_index(data[:-1]) is None
    for size in (0, 1, 1000, (128 << 10) - 1, 128 << 10, 64 << 20):
        assert wholeread.compressed_bound(size) == chunking.compressed_bound(size)


async def test_the_fast_paths_reads_serve_what_the_service_serves(tmp_path: Path) -> None:
    """PackedReads (no service, read-only) reads the packed store's runs and whole blobs as the service does."""
    from nixcas.castore.blob.wholeread import PackedReads

    root = tmp_path / "blobs"
    blobs = PackedBlobService(root)
    try:
        node, directories, nar = await tree_in(tmp_path, blobs)
        plan = plan_nar(node, await dump_module.fetch_raw_closure(node, directories))
        reads = PackedReads(str(root))
        out_path = tmp_path / "out.nar"
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT)
        try:
            assert dump_module.write_planned(dump_module.Output(fd), plan, reads) is None
        finally:
            os.close(fd)
            reads.close()
        assert out_path.read_bytes() == nar
        for i in range(len(plan.sizes)):  # one by one: the same bytes as the service's
            buffer = memoryview(bytearray(plan.sizes[i] + (1 << 20)))
            reads = PackedReads(str(root))
            mine = reads.read_whole(plan.digests[i], plan.sizes[i], buffer)
            reads.close()
            theirs = blobs.read_whole(plan.digests[i], plan.sizes[i], memoryview(bytearray(len(buffer))))
            assert mine is not None and theirs is not None and bytes(mine) == bytes(theirs)
    finally:
        await blobs.close()


async def test_a_failed_write_returns_only_once_the_reader_is_done(tmp_path: Path) -> None:
    """The caller closes its reads (the fast path: a SQLite connection) right after: no job may still run then.

    (A closed pipe used to return at once, and closing the connection under the running job crashed the process.)
    """
    import time

    from nixcas.castore.blob.wholeread import PackedReads

    root, plan, _ = await packed_plan(tmp_path)
    running: list[int] = []

    class SlowReads(PackedReads):
        def read_run(self, wanted: Sequence[tuple[bytes, int]], buffer: memoryview) -> list[bytes | memoryview] | None:
            running.append(1)
            time.sleep(0.05)
            try:
                return super().read_run(wanted, buffer)
            finally:
                running.pop()

    r, w = os.pipe()
    os.close(r)
    reads = SlowReads(str(root))
    monkey = pytest.MonkeyPatch()
    monkey.setattr(dump_module, "RUN_FILES", 8)  # several jobs, some still queued or running at the failure
    try:
        with pytest.raises(BrokenPipeError):
            dump_module.write_planned(dump_module.Output(w), plan, reads)
        assert running == []
    finally:
        monkey.undo()
        reads.close()
        os.close(w)


async def test_runs_are_read_on_the_writing_thread_and_big_files_on_the_worker(tmp_path: Path) -> None:
    """Small files are read where they are written (a second thread only took turns with it for the GIL); bigger
    ones are read ahead by the worker; the NAR is the same.  A run that fails there is handed back unread."""
    import time

    from nixcas.castore.blob.wholeread import PackedReads

    root, plan, nar = await packed_plan(tmp_path)
    threads: dict[str, set[int]] = {"run": set(), "whole": set()}

    class Recording(PackedReads):
        def read_run(self, wanted: Sequence[tuple[bytes, int]], buffer: memoryview) -> list[bytes | memoryview] | None:
            threads["run"].add(threading.get_ident())
            return super().read_run(wanted, buffer)

        def read_whole(self, digest: bytes, size: int, buffer: memoryview) -> bytes | memoryview | None:
            threads["whole"].add(threading.get_ident())
            time.sleep(0.01)  # the runs after the big files go on meanwhile
            return super().read_whole(digest, size, buffer)

    r, w = os.pipe()
    got = bytearray()

    def drain() -> None:
        while piece := os.read(r, 1 << 16):
            got.extend(piece)

    reader = threading.Thread(target=drain)
    reader.start()
    reads = Recording(str(root))
    try:
        assert dump_module.write_planned(dump_module.Output(w), plan, reads) is None
    finally:
        os.close(w)
        reader.join()
        os.close(r)
        reads.close()
    assert bytes(got) == nar
    assert threads["run"] == {threading.get_ident()}
    assert threads["whole"] and threading.get_ident() not in threads["whole"]

    class Failing(PackedReads):
        def read_run(self, wanted: Sequence[tuple[bytes, int]], buffer: memoryview) -> list[bytes | memoryview] | None:
            raise OSError("no run today")

    out = tmp_path / "out.nar"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    failing = Failing(str(root))
    try:
        unread = dump_module.write_planned(dump_module.Output(fd), plan, failing)
    finally:
        os.close(fd)
        failing.close()
    assert unread is not None and unread.start == 0 and isinstance(unread.error, OSError)
    assert out.read_bytes() == b""  # nothing of the run was written


def test_job_bounds_of_a_full_window_agree_with_the_file_by_file_rule() -> None:
    """The shortcut for a window of small files gives the bounds the file-by-file rule gives, whatever the sizes."""

    def by_rule(sizes: list[int], i: int, n: int, run_max: int) -> tuple[int, int]:
        stop, total = i, 0
        while stop < n and stop - i < rawplan.RUN_FILES and sizes[stop] <= run_max:
            if total + sizes[stop] > dump_module.RUN_BYTES:
                break
            total += sizes[stop]
            stop += 1
        return max(stop, i + 1), total

    rng = random.Random(3)  # noqa: S311
    run_max = 128 << 10
    for _ in range(200):
        typical = rng.choice([1, 500, 1000, 2000, 100_000])
        sizes = [rng.randint(1, typical) for _ in range(rng.randint(1, 3000))]
        if rng.random() < 0.3:
            sizes[rng.randrange(len(sizes))] = run_max + 1
        i = rng.randrange(len(sizes))
        if sizes[i] > run_max:
            continue
        stop, total, kind = dump_module._job_bounds(sizes, i, len(sizes), run_max, 64 << 20)
        assert kind == dump_module._RUN
        assert (stop, total) == by_rule(sizes, i, len(sizes), run_max)


def test_the_fast_paths_reads_have_a_decompressor_per_thread(tmp_path: Path) -> None:
    """read_run and read_whole may run on two threads at once: they never share a zstd decompressor."""
    from nixcas.castore.blob.wholeread import PackedReads

    reads = PackedReads(str(tmp_path))
    mine = reads._decompressor()
    assert reads._decompressor() is mine
    theirs: list[object] = []
    other = threading.Thread(target=lambda: theirs.append(reads._decompressor()))
    other.start()
    other.join()
    assert theirs and theirs[0] is not mine
    reads.close()
