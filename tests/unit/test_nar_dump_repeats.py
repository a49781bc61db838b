"""``dump-path`` on trees that hold the same file or directory many times, and the pack index read in one scan.

Copies of a small file are read and BLAKE3-checked once per NAR (a verified copy kept for the
later ones); a directory held again is planned from the entries read the first time; a dump of
most of a store's small blobs takes their pack rows from one scan of the index.  The NAR must
stay byte for byte the same, and nothing unverified may be written.
"""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import blake3
import pytest

from nixcas.castore.blob import packfile
from nixcas.castore.blob.packed import PackedBlobService
from nixcas.castore.blob.wholeread import PackedReads
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.ingest import ingest_path
from nixcas.castore.nodes import Node
from nixcas.store.nar import dump as dump_module
from nixcas.store.nar import rawplan
from nixcas.store.nar.rawplan import Plan, plan_nar
from nixcas.store.nar.render import render_nar

SAME = b"the same header, again and again\n" * 40


def write_tree(root: Path) -> None:
    """Copies of one small file at several places, two identical directories, distinct files between them."""
    for i in range(12):
        path = root / f"d{i % 3}" / f"f{i:02d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"distinct {i}\n".encode() * (i + 1))
        (root / f"d{i % 3}" / f"same{i:02d}").write_bytes(SAME)
    for twin in ("x", "y"):  # the same directory twice
        (root / twin / "inner").mkdir(parents=True)
        (root / twin / "inner" / "h").write_bytes(SAME)
        (root / twin / "g").write_bytes(b"in a twin\n")
    (root / "big").write_bytes(os.urandom(300 << 10))  # above the packs' limit: a chunked blob


async def packed_tree(tmp_path: Path) -> tuple[Path, Plan, bytes, tuple[Node, dict[bytes, bytes]]]:
    """The tree imported into a packed store (closed again): its directory, the plan, the NAR, and the root node
    with its directory closure (stored bytes by digest)."""
    write_tree(tmp_path / "tree")
    root = tmp_path / "blobs"
    blobs = PackedBlobService(root)
    try:
        directories = MemoryDirectoryService()
        node = await ingest_path(tmp_path / "tree", blobs, directories)
        nar = b"".join([chunk async for chunk in render_nar(node, blobs, directories)])
        closure = await dump_module.fetch_raw_closure(node, directories)
        return root, plan_nar(node, closure), nar, (node, closure)
    finally:
        await blobs.close()


class Recording(PackedReads):
    """The fast path's reads, counting the digests each run asks for."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.asked: Counter[bytes] = Counter()

    def read_run(self, wanted: Sequence[tuple[bytes, int]], buffer: memoryview) -> list[bytes | memoryview] | None:
        self.asked.update(digest for digest, _ in wanted)
        return super().read_run(wanted, buffer)


def dump_with(reads: PackedReads, plan: Plan, path: Path) -> dump_module.Unread | None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        return dump_module.write_planned(dump_module.Output(fd), plan, reads)
    finally:
        os.close(fd)
        reads.close()


@pytest.mark.parametrize("runs", [1024, 1], ids=["one-run", "a-run-per-file"])
async def test_copies_of_a_small_file_are_read_and_checked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runs: int
) -> None:
    monkeypatch.setattr(dump_module, "RUN_FILES", runs)
    root, plan, nar, _ = await packed_tree(tmp_path)
    same = blake3.blake3(SAME).digest()
    assert plan.digests.count(same) == 14
    reads = Recording(str(root))
    assert dump_with(reads, plan, tmp_path / "out.nar") is None
    assert (tmp_path / "out.nar").read_bytes() == nar
    assert reads.asked[same] == 1
    monkeypatch.setattr(dump_module, "KEPT_BYTES", len(SAME) - 1)  # no room to keep it: read by each run holding it
    reads = Recording(str(root))
    assert dump_with(reads, plan, tmp_path / "out.nar") is None
    assert (tmp_path / "out.nar").read_bytes() == nar
    assert reads.asked[same] == (14 if runs == 1 else 1)


async def test_a_copy_listed_with_another_size_is_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept copy is checked against each later file's size, as a read checks it: the run is handed back unread."""
    monkeypatch.setattr(dump_module, "RUN_FILES", 1)
    root, plan, nar, _ = await packed_tree(tmp_path)
    same = blake3.blake3(SAME).digest()
    second = plan.digests.index(same, plan.digests.index(same) + 1)
    sizes = list(plan.sizes)
    sizes[second] += 1
    unread = dump_with(Recording(str(root)), Plan(plan.frames, plan.digests, sizes, plan.paths), tmp_path / "out.nar")
    assert unread is not None and (unread.start, unread.stop) == (second, second + 1)
    assert (tmp_path / "out.nar").read_bytes() == nar[: plan.offset(second)]


async def test_a_damaged_blob_in_a_run_with_kept_copies_fails_it(tmp_path: Path) -> None:
    """The run is read through the kept copies' path; a blob damaged in the pack still stops it before a byte."""
    from nixcas.testing import packed

    root, plan, nar, _ = await packed_tree(tmp_path)
    data = (tmp_path / "tree" / "d1" / "f04").read_bytes()
    assert packed.corrupt_blob(root, blake3.blake3(data).digest(), data[:-1] + b"?", compress=False)
    unread = dump_with(Recording(str(root)), plan, tmp_path / "out.nar")
    run = next(i for i, size in enumerate(plan.sizes) if size <= PackedReads.run_max)  # (after the big file)
    assert unread is not None and unread.start == run and unread.error is None
    assert (tmp_path / "out.nar").read_bytes() == nar[: plan.offset(run)]


async def test_runs_take_their_rows_from_one_scan_of_a_small_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, plan, nar, _ = await packed_tree(tmp_path)
    db = sqlite3.connect(f"file:{root / packfile.DB_NAME}?mode=ro", uri=True)
    try:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        assert packfile.read_index_rows(db, pages * packfile._LOOKUPS_PER_PAGE - 1) is None  # lookups are cheaper
        index = packfile.read_index_rows(db, pages * packfile._LOOKUPS_PER_PAGE)
        assert index is not None and len(index) == db.execute("SELECT count(*) FROM blobs").fetchone()[0]
        monkeypatch.setattr(packfile, "INDEX_SCAN_PAGES", pages - 1)
        assert packfile.read_index_rows(db, 1 << 30) is None  # too big to hold
    finally:
        db.close()
    monkeypatch.setattr(packfile, "_LOOKUPS_PER_PAGE", 0)
    monkeypatch.setattr(packfile, "INDEX_SCAN_PAGES", 1 << 20)
    reads = Recording(str(root))
    assert dump_with(reads, plan, tmp_path / "out.nar") is None
    assert reads._rows is not None
    assert (tmp_path / "out.nar").read_bytes() == nar
    scanned = PackedReads(str(root))  # a digest the index does not hold: not served (the service reports it)
    scanned.will_read([b"\0" * 32])
    small = next(i for i, size in enumerate(plan.sizes) if size <= scanned.run_max)
    buffer = memoryview(bytearray(1 << 20))
    assert scanned.read_run([(plan.digests[small], plan.sizes[small])], buffer) is not None
    assert scanned.read_run([(blake3.blake3(b"absent").digest(), 6)], buffer) is None
    scanned.close()


async def test_a_directory_held_twice_is_read_once_and_planned_at_both_places(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, _, (node, closure) = await packed_tree(tmp_path)

    class Counting(dict[bytes, bytes]):
        def __init__(self, items: dict[bytes, bytes]) -> None:
            super().__init__(items)
            self.gets: Counter[bytes] = Counter()

        def get(self, digest: bytes, default: object = None) -> bytes | None:  # type: ignore[override]
            self.gets[digest] += 1
            return super().get(digest)

    counting = Counting(closure)
    again = plan_nar(node, counting)
    assert max(counting.gets.values()) == 1  # inner (held by x and y) read once
    monkeypatch.setattr(rawplan, "SEEN_ENTRIES", 0)
    counting = Counting(closure)
    without = plan_nar(node, counting)
    assert max(counting.gets.values()) == 2
    assert (again.frames, again.digests, again.sizes, again.paths) == (
        without.frames,
        without.digests,
        without.sizes,
        without.paths,
    )
    places = {path[0].show_below_root() for path in again.paths if path is not None and path[1] == b"h"}
    assert places == {"/x/inner", "/y/inner"}
