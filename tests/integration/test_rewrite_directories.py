"""``nixcas castore rewrite-directories``: converting a store between the tvix and snix size rules."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from nixcas.api import Store
from nixcas.castore.digest import B3Digest
from nixcas.castore.gc import WriteLeases
from nixcas.castore.nodes import DirectoryNode, FileNode
from nixcas.castore.sizerule import SizeRule
from nixcas.cli.store import services
from nixcas.composition import directory_service_from_url
from nixcas.errors import ConfigurationError
from nixcas.store.fsck import fsck
from nixcas.store.gc import collect_garbage
from nixcas.store.importer import import_path
from nixcas.store.nar.render import render_nar
from nixcas.store.narindex import NarIndex, UploadedNar
from nixcas.store.rewrite import rewrite_directories
from nixcas.testing.daemon import clean_env, nixcas_command
from nixcas.testing.maintenance import one_line_error

TVIX, SNIX = SizeRule.TVIX, SizeRule.SNIX

# hand-computed (see tests/test_size_rule.py): sub/{f, l -> f, inner/{x}} under each rule
SUB_DIGEST = {
    TVIX: "cf2453a8b0c4f96fc157fd1a6f48a06be541bfd6e10c0860c484884be0184b42",
    SNIX: "3f2564a3b038ff6b6316d31de4a4bf1707e2c5108dc6438388376dda2c62ce6e",
}


def make_paths(root: Path) -> list[Path]:
    """Three trees: one with files below its top level (its digest depends on the rule), one flat, one file."""
    deep = root / "deep"
    (deep / "sub" / "inner").mkdir(parents=True)
    (deep / "e").write_bytes(b"Hello World!")
    (deep / "sub" / "f").write_bytes(b"Hello World!")
    (deep / "sub" / "l").symlink_to("f")
    (deep / "sub" / "inner" / "x").write_bytes(b"")
    flat = root / "flat"
    flat.mkdir()
    (flat / "a").write_bytes(b"a")
    (root / "file").write_bytes(b"just a file")
    return [deep, flat, root / "file"]


async def nars(store: Store) -> dict[str, bytes]:
    assert store.pathinfos is not None
    out = {}
    async for info in store.pathinfos.list():
        out[str(info.store_path)] = b"".join([c async for c in render_nar(info.node, store.blobs, store.directories)])
    return out


async def clean(store: Store) -> None:
    report = await fsck(store.blobs, store.directories, store.pathinfos, store.pins)
    assert report.found == []


async def open_store(path: Path, rule: SizeRule | None = None) -> Store:
    return await Store.open(path, with_pathinfo=True, with_pins=True, size_rule=rule)


async def test_both_ways(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NIXCAS_DIRECTORY_SIZE_RULE")
    base = tmp_path / "s"
    async with await open_store(base, TVIX) as store:
        infos = [await import_path(p, services(store)) for p in make_paths(tmp_path)]
        deep = infos[0].node
        assert isinstance(deep, DirectoryNode)
        assert store.pins is not None
        await store.pins.pin("deep-root", deep.digest)
        before = await nars(store)
    index = NarIndex(str(tmp_path / "nar-bridge.sqlite"))
    await index.add(UploadedNar(infos[0].nar_sha256, infos[0].nar_size, deep), infos[0].nar_sha256, "none")

    for target in (SNIX, TVIX):
        async with await open_store(base) as store:
            dry = await rewrite_directories(
                store.directories, target, pathinfos=store.pathinfos, pins=store.pins, nar_index=index, dry_run=True
            )
            assert (dry.converted, dry.recorded, store.directories.size_rule) == (4, False, target.other)
            report = await rewrite_directories(
                store.directories, target, pathinfos=store.pathinfos, pins=store.pins, nar_index=index
            )
            # deep (PathInfo, pin, NAR index) and flat (its recorded size changes) convert; the file does not
            assert (report.roots, report.converted, report.missing, report.recorded) == (4, 4, [], True)
            assert store.directories.size_rule is target
            await clean(store)
            assert await nars(store) == before  # the same NAR bytes
            assert store.pathinfos is not None and store.pins is not None
            new_deep = (await store.pathinfos.get(infos[0].store_path.digest)).node  # type: ignore[union-attr]
            assert isinstance(new_deep, DirectoryNode)
            top = await store.directories.get(new_deep.digest)
            assert top is not None and top.get(b"sub") is not None
            assert top.get(b"sub").digest.hex() == SUB_DIGEST[target]  # type: ignore[union-attr]
            assert [p.digest for p in await store.pins.list()] == [new_deep.digest]
            uploaded = await index.get(infos[0].nar_sha256)
            assert uploaded is not None and uploaded.node == new_deep
            file_info = await store.pathinfos.get(infos[2].store_path.digest)
            assert file_info is not None and isinstance(file_info.node, FileNode)
            # idempotent: a second run looks at every root again and finds nothing to do
            again = await rewrite_directories(
                store.directories, target, pathinfos=store.pathinfos, pins=store.pins, nar_index=index
            )
            assert (again.converted, again.directories_written, again.missing, again.recorded) == (0, 0, [], True)
        # the rule is recorded: opening with the old one is refused
        with pytest.raises(ConfigurationError, match=f"follows the {target} directory size rule"):
            await open_store(base, target.other)
    await index.close()

    # the old directories are garbage: a collection frees them and the store stays whole
    async with await open_store(base) as store:
        old = B3Digest(bytes.fromhex(SUB_DIGEST[SNIX]))
        assert await store.directories.get(old) is not None
        await collect_garbage(
            store.blobs, store.directories, store.pathinfos, store.pins, WriteLeases(base / "leases"), grace_ns=0
        )
        assert await store.directories.get(old) is None
        await clean(store)
        assert await nars(store) == before


async def test_interrupted_run_is_finished_by_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NIXCAS_DIRECTORY_SIZE_RULE")
    base = tmp_path / "s"
    async with await open_store(base, TVIX) as store:
        for p in make_paths(tmp_path):
            await import_path(p, services(store))
        before = await nars(store)

    # each run counts its own writes: stop after a closure upload, then after a switch, then after the next upload
    for n in (1, 2, 1):
        async with await open_store(base) as store:
            with pytest.raises(Crash):
                await rewrite_directories(
                    store.directories, SNIX, pathinfos=store.pathinfos, pins=store.pins, step=crash_after(n)
                )
            assert store.directories.size_rule is TVIX  # not recorded before the end
    async with await open_store(base) as store:
        assert store.directories.size_rule is TVIX
        report = await rewrite_directories(store.directories, SNIX, pathinfos=store.pathinfos, pins=store.pins)
        assert report.already >= 1 and report.recorded
        await clean(store)
        assert await nars(store) == before


class Crash(BaseException):
    pass


def crash_after(n: int) -> Callable[[int], None]:
    def step(done: int) -> None:
        if done >= n:
            raise Crash

    return step


async def test_an_interrupted_run_can_be_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Toward snix, killed after a switch; then --to tvix (the rule the store still records) converts back."""
    monkeypatch.delenv("NIXCAS_DIRECTORY_SIZE_RULE")
    base = tmp_path / "s"
    async with await open_store(base, TVIX) as store:
        infos = [await import_path(p, services(store)) for p in make_paths(tmp_path)]
        before = await nars(store)
    async with await open_store(base) as store:
        with pytest.raises(Crash):
            await rewrite_directories(store.directories, SNIX, pathinfos=store.pathinfos, step=crash_after(2))
    async with await open_store(base) as store:
        assert store.directories.size_rule is TVIX and store.pathinfos is not None
        pathinfos = store.pathinfos

        async def nodes() -> list[object]:
            return [getattr(await pathinfos.get(i.store_path.digest), "node", None) for i in infos]

        assert await nodes() != [i.node for i in infos]  # one was switched to its snix tree
        report = await rewrite_directories(store.directories, TVIX, pathinfos=store.pathinfos, pins=store.pins)
        assert report.converted >= 1 and report.recorded
        assert await nodes() == [i.node for i in infos]
        await clean(store)
        assert await nars(store) == before


async def test_the_nar_index_follows_its_path_info_after_gc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after a PathInfo switch, then `gc` frees the old tree only the NAR index named: the next run
    points the index at the PathInfo's tree instead of leaving it missing."""
    monkeypatch.delenv("NIXCAS_DIRECTORY_SIZE_RULE")
    base = tmp_path / "s"
    async with await open_store(base, TVIX) as store:
        info = await import_path(make_paths(tmp_path)[0], services(store))
    assert isinstance(info.node, DirectoryNode)
    index = NarIndex(str(tmp_path / "nar-bridge.sqlite"))
    await index.add(UploadedNar(info.nar_sha256, info.nar_size, info.node), info.nar_sha256, "none")
    async with await open_store(base) as store:
        with pytest.raises(Crash):
            await rewrite_directories(
                store.directories, SNIX, pathinfos=store.pathinfos, nar_index=index, step=crash_after(2)
            )
    async with await open_store(base) as store:
        await collect_garbage(
            store.blobs, store.directories, store.pathinfos, store.pins, WriteLeases(base / "leases"), grace_ns=0
        )
        assert await store.directories.get(info.node.digest) is None  # the old tree is gone
        report = await rewrite_directories(store.directories, SNIX, pathinfos=store.pathinfos, nar_index=index)
        assert (report.missing, report.recorded) == ([], True)
        assert store.pathinfos is not None
        switched = await store.pathinfos.get(info.store_path.digest)
        uploaded = await index.get(info.nar_sha256)
        assert switched is not None and uploaded is not None and uploaded.node == switched.node
    await index.close()


async def test_refuses_a_store_it_cannot_convert() -> None:
    memory = await directory_service_from_url("memory://")
    with pytest.raises(ConfigurationError, match="not a daemon, cache or memory"):
        await rewrite_directories(memory, SNIX)


async def test_sigkill_then_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NIXCAS_DIRECTORY_SIZE_RULE")
    base = tmp_path / "s"
    async with await open_store(base, TVIX) as store:
        infos = [await import_path(p, services(store)) for p in make_paths(tmp_path)]
    env = clean_env() | {"NIXCAS_STORE_DIR": str(base)}
    rewrite = nixcas_command("castore", "rewrite-directories", "--to", "snix", "--json")
    killed = await asyncio.to_thread(
        subprocess.run,
        rewrite,
        env=env | {"NIXCAS_TEST_REWRITE_KILL_AFTER": "2"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert killed.returncode == -9, killed  # a real SIGKILL, after a closure upload and a switch
    async with await open_store(base) as store:
        assert store.directories.size_rule is TVIX
    done = await asyncio.to_thread(subprocess.run, rewrite, env=env, capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    assert report["recorded"] and report["already"] == 1 and report["source"] == "tvix"
    async with await open_store(base) as store:
        assert store.directories.size_rule is SNIX
        await clean(store)
        assert store.pathinfos is not None
        for old in infos:  # every path still renders to the NAR its PathInfo names
            info = await store.pathinfos.get(old.store_path.digest)
            assert info is not None and info.nar_sha256 == old.nar_sha256
            nar = b"".join([c async for c in render_nar(info.node, store.blobs, store.directories)])
            assert hashlib.sha256(nar).digest() == info.nar_sha256


def test_cli_contradicting_rule_is_one_line(tmp_path: Path) -> None:
    env = clean_env() | {"NIXCAS_STORE_DIR": str(tmp_path / "s")}
    env.pop("NIXCAS_DIRECTORY_SIZE_RULE", None)
    made = subprocess.run(
        nixcas_command("castore", "ingest", str(make_paths(tmp_path)[0]), "--json"),
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(made.stdout)["size"] == 8  # the snix size of the tree (a new store's default)
    refused = subprocess.run(
        nixcas_command("--directory-size-rule", "tvix", "castore", "ingest", str(tmp_path / "file")),
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    one_line_error(refused, 2, "follows the snix directory size rule, not the requested tvix")


async def test_object_store_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Closure objects are checked as they are read: a converted tree reads under the target rule."""
    monkeypatch.delenv("NIXCAS_DIRECTORY_SIZE_RULE")
    base, url = tmp_path / "s", f"objectstore+file://{tmp_path / 'objects'}"

    async def opened(rule: SizeRule | None = None) -> Store:
        return await Store.open(base, directory_service_url=url, with_pathinfo=True, with_pins=True, size_rule=rule)

    async with await opened(TVIX) as store:
        for p in make_paths(tmp_path):
            await import_path(p, services(store))
        before = await nars(store)

    def crash(done: int) -> None:
        if done >= 2:
            raise KeyboardInterrupt

    async with await opened() as store:
        with pytest.raises(KeyboardInterrupt):
            await rewrite_directories(store.directories, SNIX, pathinfos=store.pathinfos, step=crash)
    for target in (SNIX, TVIX):
        async with await opened() as store:
            report = await rewrite_directories(store.directories, target, pathinfos=store.pathinfos, pins=store.pins)
            assert report.recorded and report.missing == []
            await clean(store)
            assert await nars(store) == before
    assert (tmp_path / "objects" / "dirs" / "size-rule").read_bytes() == b"tvix\n"
