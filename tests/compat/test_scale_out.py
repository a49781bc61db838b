"""Many daemons, one store: two ``nixcas daemon`` processes on the same SeaweedFS + PostgreSQL.

One daemon imports, the other serves what it imported at once; a client with
a local near store in front of the cluster fetches each byte from it once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import blake3
import psycopg
import pytest
from test_nar import InstrumentedBlobs

from nixcas.castore.blob.combined import CombinedBlobService
from nixcas.castore.blob.local import LocalBlobService
from nixcas.castore.dirs.cache import CacheDirectoryService
from nixcas.castore.dirs.sqlite import SqliteDirectoryService
from nixcas.castore.objectstore import ObjectStore, parse_objectstore_url
from nixcas.castore.sizerule import SizeRule
from nixcas.composition import blob_service_from_url, directory_service_from_url, pathinfo_service_from_url
from nixcas.store.nar.render import render_nar
from nixcas.store.pathinfo.cache import CachePathInfoService
from nixcas.store.pathinfo.sqlite import SqlitePathInfoService
from nixcas.store.store_path import StorePath
from nixcas.testing.daemon import Daemon, clean_env, nixcas_command, running_daemon, short_tmpdir
from nixcas.testing.maintenance import one_line_error, write_tree
from nixcas.testing.nix import NIX_STORE, run_nix
from nixcas.testing.postgres import PASSWORD, PostgresServer
from nixcas.testing.seaweedfs import SECRET_KEY, SeaweedFS, free_port


def addrs(blob: str, directory: str, pathinfo: str) -> list[str]:
    return ["--blob-service-addr", blob, "--directory-service-addr", directory, "--path-info-service-addr", pathinfo]


def via(daemon: Daemon) -> list[str]:
    url = daemon.client_url()
    return addrs(url, url, url)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nixcas_command(*args), capture_output=True, text=True, env=clean_env(), check=False)


def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(nixcas_command(*args), capture_output=True, env=clean_env(), check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    big = blake3.blake3(b"scale-out big").digest(length=3 << 20)  # several chunks
    files: dict[str, object] = {f"f{i}": f"file {i}\n".encode() * (i + 1) for i in range(40)}
    return write_tree(
        tmp_path / "src" / "tree",
        {"big": big, "small": files, "deeper": {"x": b"x\n", "more": {"y": b"y" * 70_000}}},
    )


def chunk_objects(url: str) -> int:
    """How many chunk objects the store at ``url`` holds now (listed directly)."""

    async def count() -> int:
        store = ObjectStore(*parse_objectstore_url(urlsplit(url)))
        return sum([len(page) async for page in store.list("chunks/b3/")])

    return asyncio.run(count())


def content_bytes(root: Path) -> int:
    """Bytes of distinct file contents under ``root`` (counted here, not by the store)."""
    seen: dict[bytes, int] = {}
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            seen[hashlib.sha256(data).digest()] = len(data)
    return sum(seen.values())


async def test_two_daemons_one_store_and_a_client_cache(
    seaweedfs: SeaweedFS, s3_url: str, pg_url: str, tree: Path, tmp_path: Path
) -> None:
    shared = addrs(s3_url, pg_url, pg_url)
    with short_tmpdir() as sockets:
        with (
            running_daemon("-l", str(sockets / "a.sock"), store=None, log=tmp_path / "a.log", global_args=shared) as a,
            running_daemon("-l", str(sockets / "b.sock"), store=None, log=tmp_path / "b.log", global_args=shared) as b,
        ):
            # Import through A ...
            store_path = run_cli(*via(a), "import", str(tree)).stdout.decode().strip()
            assert store_path.startswith("/nix/store/")
            # ... and B serves it at once: PathInfo, closure and every blob.
            dumped = run_cli(*via(b), "dump-path", store_path).stdout
            if NIX_STORE is not None:
                assert dumped == run_nix([NIX_STORE, "--dump", str(tree)], tmp_path, binary=True)
            assert dumped == run_cli(*via(a), "dump-path", store_path).stdout

            # A client: local near stores in front of daemon B.
            far_blobs = InstrumentedBlobs(await blob_service_from_url(b.client_url()))
            blobs = CombinedBlobService(LocalBlobService(tmp_path / "near" / "blobs"), far_blobs)
            dirs = CacheDirectoryService(
                SqliteDirectoryService(str(tmp_path / "near" / "dirs.sqlite"), size_rule=SizeRule.TVIX),
                await directory_service_from_url(b.client_url()),
            )
            pathinfos = CachePathInfoService(
                SqlitePathInfoService(str(tmp_path / "near" / "pi.sqlite")),
                await pathinfo_service_from_url(b.client_url()),
            )
            digest = StorePath.parse(store_path).digest
            for round_ in range(2):
                info = await pathinfos.get(digest)
                assert info is not None
                nar = b"".join([c async for c in render_nar(info.node, blobs, dirs)])
                assert nar == dumped
                # Each byte comes from the cluster once: all of it in the first round, none after.
                assert far_blobs.bytes_read == (content_bytes(tree) if round_ == 0 else 0)
                far_blobs.bytes_read = 0
            await far_blobs.inner.close()
            await blobs.near.close()
            await dirs.far.close()
            await pathinfos.far.close()

        # With both daemons gone, the client still has everything near.
        info = await pathinfos.near.get(digest)
        assert info is not None
        assert b"".join([c async for c in render_nar(info.node, blobs.near, dirs.near)]) == dumped
    await dirs.near.close()
    await pathinfos.near.close()
    assert os.path.exists(tmp_path / "near" / "blobs")


# -- faults, as an operator meets them ------------------------------------------------------------------


def test_daemon_refuses_to_start_on_an_unusable_backend(
    seaweedfs: SeaweedFS, s3_url: str, pg_url: str, pg_server: PostgresServer, tmp_path: Path
) -> None:
    dead = seaweedfs.url("nixcas", "x", endpoint=f"http://127.0.0.1:{free_port()}", max_retries="1")
    wrong_password = pg_url.replace(PASSWORD, "not-the-password")
    for args, fragment in (
        (addrs(dead, pg_url, pg_url), "unreachable"),
        (addrs(s3_url.replace(SECRET_KEY, "wrong"), pg_url, pg_url), "access denied"),
        (addrs(seaweedfs.url("no-such-bucket"), pg_url, pg_url), "bucket does not exist"),
        (addrs(s3_url, wrong_password, pg_url), "password"),
        (addrs(s3_url, pg_server.url("no_such_db"), pg_url), "no_such_db"),
    ):
        result = subprocess.run(
            nixcas_command(*args, "daemon", "-l", str(tmp_path / "d.sock")),
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=120,
            check=False,
        )
        assert result.returncode != 0
        one_line_error(result, result.returncode, fragment)
        assert "not-the-password" not in result.stderr and "wrong" not in result.stderr.replace("wrong credentials", "")


def test_import_survives_the_object_store_dying_mid_way(pg_url: str, tree: Path, tmp_path: Path) -> None:
    """S3 killed during an import: a clear error, nothing of the path visible, and the retry succeeds."""
    server = SeaweedFS(tmp_path / "weed")
    server.start()
    try:
        server.create_bucket("dying")
        # A generous per-request timeout: a slow fresh machine must not fail the import before
        # the kill; once the server is gone, connections are refused at once and one retry ends it.
        s3 = server.url("dying", "p", max_retries="1", retry_timeout="3", timeout="60")
        big = tmp_path / "src" / "tree" / "huge"
        big.write_bytes(blake3.blake3(b"huge").digest(length=128 << 20))
        args = [*addrs(s3, pg_url, pg_url), "import", str(tree)]
        proc = subprocess.Popen(nixcas_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and chunk_objects(s3) < 40:
            time.sleep(0.02)
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"the import ended ({proc.returncode}) before the server could be killed: {err.decode()}"
            )
        server.kill()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, out
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err.decode(), err
        assert "unreachable" in lines[0], lines[0]
        with psycopg.connect(pg_url) as conn:  # nothing of the path became visible
            assert conn.execute("SELECT count(*) FROM nixcas_pathinfo").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM nixcas_directories").fetchone() == (0,)

        server.start()
        store_path = run_cli(*args).stdout.decode().strip()
        dumped = run_cli(*addrs(s3, pg_url, pg_url), "dump-path", store_path).stdout
        if NIX_STORE is not None:
            assert dumped == run_nix([NIX_STORE, "--dump", str(tree)], tmp_path, binary=True)
    finally:
        server.kill()


def test_gc_across_s3_and_postgresql(s3_url: str, pg_url: str, tmp_path: Path) -> None:
    """`nixcas gc` against the shared stores: frees what only a deleted path used, keeps the rest whole."""
    s3 = s3_url + "&refresh_after=1"  # so that a grace of a few seconds is allowed
    stores = addrs(s3, pg_url, pg_url)
    shared = {"lib": b"shared library\n" * 1000}
    keep = write_tree(tmp_path / "src" / "keep", {"shared": shared, "k": b"only in keep\n"})  # type: ignore[dict-item]
    drop = write_tree(
        tmp_path / "src" / "drop",
        {"shared": shared, "d": b"only in drop\n", "big": blake3.blake3(b"drop").digest(length=1 << 20)},  # type: ignore[dict-item]
    )
    keep_path = run_cli(*stores, "import", str(keep)).stdout.decode().strip()
    drop_path = run_cli(*stores, "import", str(drop)).stdout.decode().strip()
    refused = cli(*stores, "gc", "--grace", "1s")
    one_line_error(refused, refused.returncode, "too short")
    run_cli(*stores, "delete", drop_path)
    time.sleep(3.2)
    report = json.loads(run_cli(*stores, "gc", "--grace", "3s", "--json").stdout)
    assert report["kinds"]["blob"]["freed"] == 1  # big's index (a small file is its chunk object alone)
    assert report["kinds"]["directory"]["freed"] == 1  # drop's root ("shared" is keep's too)
    assert report["kinds"]["chunk"]["freed"] >= 3  # d, and big's chunks; the shared lib stays
    dumped = run_cli(*stores, "dump-path", keep_path).stdout
    if NIX_STORE is not None:
        assert dumped == run_nix([NIX_STORE, "--dump", str(keep)], tmp_path, binary=True)
    again = json.loads(run_cli(*stores, "gc", "--grace", "3s", "--json").stdout)
    assert again["freed"] == 0
    checked = cli(*stores, "fsck", "--check-contents", "--check-nar")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # An object lost behind the store's back is found.
    lost = blake3.blake3(b"only in keep\n").hexdigest()

    async def lose() -> None:
        store = ObjectStore(*parse_objectstore_url(urlsplit(s3_url)))
        await store.delete(f"chunks/b3/{lost[:4]}/{lost}")

    asyncio.run(lose())
    damaged = cli(*stores, "fsck", "--check-contents")
    assert damaged.returncode == 1 and lost in damaged.stdout + damaged.stderr, damaged


def test_unreachable_backends_are_unavailable_on_the_wire() -> None:
    """A daemon answers a backend outage with UNAVAILABLE (clients retry), not INTERNAL."""
    import grpc

    from nixcas.castore.grpc.status import status_of
    from nixcas.errors import StorageError, UnavailableError

    assert status_of(UnavailableError("s3://b: object store unreachable"))[0] == grpc.StatusCode.UNAVAILABLE
    assert status_of(StorageError("s3://b: access denied"))[0] == grpc.StatusCode.INTERNAL


def test_pins_are_shared_by_every_host_of_the_store(s3_url: str, pg_url: str, tmp_path: Path) -> None:
    """Two daemons on one SeaweedFS + PostgreSQL: a pin made through host A keeps its data through host B's gc.

    Each host has its own store directory (as two machines would); before pins lived with the
    store, host A's pin went to A's DIR/pins.sqlite, host B's gc deleted the pinned tree, and
    host B's fsck reported B's own local pin as missing from S3.
    """
    s3 = s3_url + "&refresh_after=1"  # so that a grace of a few seconds is allowed
    shared = addrs(s3, pg_url, pg_url)
    host_a, host_b = ["--store-dir", str(tmp_path / "host-a")], ["--store-dir", str(tmp_path / "host-b")]
    keep = write_tree(tmp_path / "src" / "keep", {"k": b"kept by a pin\n", "sub": {"x": b"x" * 50_000}})
    drop = write_tree(tmp_path / "src" / "drop", {"d": b"garbage\n"})
    local = write_tree(tmp_path / "src" / "local", {"l": b"only in host B's own embedded store\n"})
    with (
        short_tmpdir() as sockets,
        running_daemon(
            "-l", str(sockets / "a.sock"), store=tmp_path / "host-a", log=tmp_path / "a.log", global_args=shared
        ) as a,
        running_daemon(
            "-l", str(sockets / "b.sock"), store=tmp_path / "host-b", log=tmp_path / "b.log", global_args=shared
        ) as b,
    ):
        # Host A, as a client of its daemon: ingest and pin in one step, and garbage beside it.
        pinned = json.loads(run_cli(*host_a, *via(a), "castore", "ingest", "--json", "--pin", "keep", str(keep)).stdout)
        garbage = json.loads(run_cli(*host_a, *via(a), "castore", "ingest", "--json", str(drop)).stdout)
        # Host B sees the pin, through its daemon and directly on the shared stores.
        for config in (via(b), shared):
            listed = run_cli(*host_b, *config, "castore", "pins").stdout.decode().split("\t")
            assert listed[:2] == ["keep", pinned["digest"]], listed
        # Host B's own embedded store has a pin of its own, which is not the shared store's.
        run_cli(*host_b, "castore", "ingest", "--pin", "local", str(local))

        time.sleep(3.2)
        gc = run_cli(*host_b, *shared, "gc", "--grace", "3s", "--json")
        report = json.loads(gc.stdout)
        assert report["kinds"]["directory"]["freed"] == 1, report  # drop's root; keep's two stay
        assert report["kinds"]["directory"]["live"] == 2, report
        # The pinned tree survived, whole, as host A sees it.
        listing = run_cli(*host_a, *via(a), "castore", "ls", "-r", pinned["digest"]).stdout.decode()
        assert "sub/x" in listing
        sub_x = blake3.blake3(b"x" * 50_000).hexdigest()
        assert run_cli(*host_a, *via(a), "castore", "cat", sub_x).stdout == b"x" * 50_000
        missing = cli(*host_a, *via(a), "castore", "ls", garbage["digest"])
        assert missing.returncode == 1 and "not found" in missing.stderr

        # fsck of the shared store checks the shared pins (keep: fine), not host B's local file.
        checked = cli(*host_b, *shared, "fsck", "--check-contents")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "pin local" not in checked.stdout + checked.stderr

        # Unpinned through host B, the tree goes at the next collection.
        run_cli(*host_b, *via(b), "castore", "unpin", "keep")
        time.sleep(3.2)
        again = json.loads(run_cli(*host_a, *shared, "gc", "--grace", "3s", "--json").stdout)
        assert again["kinds"]["directory"]["freed"] == 2, again
