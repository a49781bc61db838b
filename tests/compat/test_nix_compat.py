"""The Nix layer against real Nix: `import` vs `nix-store --add`, `dump-path` vs `nix-store --dump`, `copy`.

Nix runs against throwaway chroot stores (``--store DIR``), never the machine's /nix/store.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from nixcas.store import nixbase32
from nixcas.store.importer import check_content_address, parse_path_infos, references_first
from nixcas.testing.daemon import running_daemon, short_tmpdir
from nixcas.testing.nix import NIX, NIX_INSTANTIATE, NIX_STORE, ODD_NAMES, fixed_tree, needs_nix, run_nix

pytestmark = needs_nix


def nixcas(store_dir: Path, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "nixcas.cli.main", "--store-dir", str(store_dir), *args],
        capture_output=True,
        input=input,
        timeout=300,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode()


def nix_add(tmp_path: Path, path: Path) -> str:
    assert NIX_STORE is not None
    return str(run_nix([NIX_STORE, "--store", str(tmp_path / "nixstore"), "--add", str(path)], tmp_path))


def nix_dump(tmp_path: Path, path: Path) -> bytes:
    assert NIX_STORE is not None
    out = run_nix([NIX_STORE, "--dump", str(path)], tmp_path, binary=True)
    assert isinstance(out, bytes)
    return out


def random_tree(root: Path, rng: random.Random, depth: int = 0) -> Path:
    root.mkdir()
    names = {rng.choice(ODD_NAMES) + str(i) if rng.random() < 0.2 else f"n{rng.randrange(10**6)}" for i in range(6)}
    for name in sorted(names)[: rng.randint(0, 6)]:
        child = root / name
        kind = rng.random()
        if kind < 0.55 or depth >= 3:
            child.write_bytes(rng.randbytes(rng.choice([0, 1, 7, 8, 9, 100, 4096, 70_000])))
            if rng.random() < 0.3:
                child.chmod(0o755)
        elif kind < 0.7:
            child.symlink_to(rng.choice(["x", "../up", "/abs/target", "ünï"]))
        else:
            random_tree(child, rng, depth + 1)
    return root


def sources(tmp_path: Path) -> list[Path]:
    src = tmp_path / "src"
    src.mkdir()
    items = [fixed_tree(src / "tree")]
    (src / "file.txt").write_bytes(b"Hello World!")
    (src / "script").write_bytes(b"#!/bin/sh\n")
    (src / "script").chmod(0o755)
    (src / "empty").write_bytes(b"")
    (src / "symlink").symlink_to("/nix/store/somewhereelse")
    (src / "emptydir").mkdir()
    items += [src / n for n in ("file.txt", "script", "empty", "symlink", "emptydir")]
    rng = random.Random(20261124)  # noqa: S311 - reproducible test data
    items += [random_tree(src / f"random-{i}", rng) for i in range(5)]
    return items


def test_import_prints_what_nix_store_add_prints(tmp_path: Path) -> None:
    items = sources(tmp_path)
    printed = ok(nixcas(tmp_path / "store", "import", *map(str, items))).splitlines()
    assert printed == [nix_add(tmp_path, p) for p in items]  # argument order


def test_dump_path_and_path_info_match_nix(tmp_path: Path) -> None:
    items = sources(tmp_path)
    store = tmp_path / "store"
    printed = ok(nixcas(store, "import", *map(str, items))).splitlines()
    for item, store_path in zip(items, printed, strict=True):
        nar = nixcas(store, "dump-path", store_path).stdout
        expected = nix_dump(tmp_path, item)
        assert nar == expected, item
        info = json.loads(ok(nixcas(store, "path-info", "--json", store_path)))
        sha = hashlib.sha256(expected).digest()
        assert info["path"] == store_path
        assert info["narSize"] == len(expected)
        assert info["narHash"] == "sha256-" + base64.b64encode(sha).decode()
        assert info["ca"] == "fixed:r:sha256:" + nixbase32.encode(sha)
        assert info["references"] == []
        text = ok(nixcas(store, "path-info", store_path))
        assert f"NarHash: sha256:{nixbase32.encode(sha)}" in text


def test_import_is_idempotent_and_dedups(tmp_path: Path) -> None:
    a = fixed_tree(tmp_path / "a")
    store = tmp_path / "store"
    first = ok(nixcas(store, "import", str(a)))
    second = ok(nixcas(store, "import", str(a)))
    assert first == second


@pytest.mark.parametrize(
    ("name", "words"),
    [("has space", "' '"), ("ünï", "not allowed"), ("x" * 212, "212"), ("a:b", "':'")],
)
def test_import_refuses_invalid_store_path_names(tmp_path: Path, name: str, words: str) -> None:
    path = tmp_path / name
    path.write_text("content")
    result = nixcas(tmp_path / "store", "import", str(path))
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.count("\n") == 1
    assert words in err
    assert not (tmp_path / "store" / "pathinfo.sqlite").exists()


def test_import_missing_path(tmp_path: Path) -> None:
    result = nixcas(tmp_path / "store", "import", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "no such file" in result.stderr.decode()


def test_dump_path_unknown_or_wrong_name(tmp_path: Path) -> None:
    src = tmp_path / "thing"
    src.write_text("x")
    store = tmp_path / "store"
    store_path = ok(nixcas(store, "import", str(src))).strip()
    wrong_name = store_path.rsplit("-", 1)[0] + "-other"
    for path in (wrong_name, "/nix/store/" + "0" * 32 + "-thing"):
        result = nixcas(store, "dump-path", path)
        assert result.returncode == 1
        assert "not in the store" in result.stderr.decode()
        assert result.stdout == b""
    for bad in ("/tmp/thing", "/nix/store/short-thing", "nix/store/" + "0" * 32 + "-x"):
        result = nixcas(store, "dump-path", bad)
        assert result.returncode == 2
        assert result.stderr.decode().count("\n") == 1


# -- copy from a Nix store ---------------------------------------------------------------


@pytest.fixture
def nix_closure(tmp_path: Path) -> tuple[Path, str, list[dict[str, object]]]:
    """A chroot Nix store with a text path referring to an added tree and another text path."""
    assert NIX_STORE is not None and NIX_INSTANTIATE is not None and NIX is not None
    nixstore = tmp_path / "nixstore"
    tree = nix_add(tmp_path, fixed_tree(tmp_path / "tree"))
    expr = f'builtins.toFile "top" "${{builtins.toFile "leaf" "leaf"}} ${{builtins.storePath "{tree}"}}"'
    top = run_nix([NIX_INSTANTIATE, "--store", str(nixstore), "--read-write-mode", "--eval", "--expr", expr], tmp_path)
    top = str(top).strip('"')
    listing = run_nix([NIX, "path-info", "--store", str(nixstore), "--json", "--recursive", top], tmp_path)
    infos = json.loads(listing)
    assert len(infos) == 3
    return nixstore / "nix" / "store", top, infos


def test_copy_from_nix_path_info_json(tmp_path: Path, nix_closure: tuple[Path, str, list[dict[str, object]]]) -> None:
    nix_store_dir, _, infos = nix_closure
    listing = tmp_path / "closure.json"
    listing.write_text(json.dumps(infos))
    store = tmp_path / "store"
    result = nixcas(store, "copy", "--nix-store-dir", str(nix_store_dir), str(listing))
    ok(result)
    assert "copied 3 paths, 0 already present" in result.stderr.decode()
    for info in infos:
        path = str(info["path"])
        ours = json.loads(ok(nixcas(store, "path-info", "--json", path)))
        assert ours["narHash"] == info["narHash"]
        assert ours["narSize"] == info["narSize"]
        assert sorted(ours["references"]) == sorted(str(r) for r in info["references"])  # type: ignore[attr-defined]
        assert ours["ca"] == info["ca"]
        assert nixcas(store, "dump-path", path).stdout == nix_dump(tmp_path, nix_store_dir / Path(path).name)
    # again: everything is present, nothing copied
    again = nixcas(store, "copy", "--nix-store-dir", str(nix_store_dir), str(listing))
    ok(again)
    assert "copied 0 paths, 3 already present" in again.stderr.decode()


def test_copy_closure_json_on_stdin_keeps_signatures_and_deriver(
    tmp_path: Path, nix_closure: tuple[Path, str, list[dict[str, object]]]
) -> None:
    nix_store_dir, top, infos = nix_closure
    sig = "cache.example.org-1:" + base64.b64encode(bytes(range(64))).decode()
    deriver = "/nix/store/" + "1" * 32 + "-top.drv"
    for info in infos:
        info["signatures"] = [sig]
        info["deriver"] = deriver
    store = tmp_path / "store"
    ok(nixcas(store, "copy", "--nix-store-dir", str(nix_store_dir), input=json.dumps({"closure": infos}).encode()))
    ours = json.loads(ok(nixcas(store, "path-info", "--json", top)))
    assert ours["signatures"] == [sig]
    assert ours["deriver"] == deriver


def test_copy_refuses_modified_content(tmp_path: Path, nix_closure: tuple[Path, str, list[dict[str, object]]]) -> None:
    nix_store_dir, top, infos = nix_closure
    victim = nix_store_dir / Path(top).name
    os.chmod(victim, 0o644)
    victim.write_text("tampered")
    store = tmp_path / "store"
    result = nixcas(store, "copy", "--nix-store-dir", str(nix_store_dir), input=json.dumps(infos).encode())
    assert result.returncode == 1
    assert "does not match" in result.stderr.decode()
    assert nixcas(store, "path-info", top).returncode == 1


@pytest.mark.parametrize(
    "document",
    [
        "not json",
        '{"closure": 5}',
        '[{"path": "/nix/store/bad"}]',
        '[{"path": "/nix/store/' + "0" * 32 + '-x", "narSize": 1}]',
        '[{"path": "/nix/store/' + "0" * 32 + '-x", "narHash": "sha256-AAAA", "narSize": 1}]',
        '[{"path": "/nix/store/' + "0" * 32 + '-x", "narHash": "md5:' + "0" * 32 + '", "narSize": 1}]',
    ],
)
def test_copy_bad_input(tmp_path: Path, document: str) -> None:
    result = nixcas(tmp_path / "store", "copy", input=document.encode())
    assert result.returncode == 2
    assert result.stderr.decode().count("\n") == 1


def test_import_and_dump_through_the_daemon(tmp_path: Path) -> None:
    """All three services on a daemon: the NAR hash is computed there (CalculateNAR), results as with Nix."""
    items = sources(tmp_path)
    with (
        short_tmpdir() as sockets,
        running_daemon(
            "-l", str(sockets / "d.sock"), store=tmp_path / "daemon-store", log=tmp_path / "daemon.log"
        ) as daemon,
    ):
        url = daemon.client_url()
        remote = ["--blob-service-addr", url, "--directory-service-addr", url, "--path-info-service-addr", url]
        client_store = tmp_path / "client-store"
        printed = ok(nixcas(client_store, *remote, "import", *map(str, items))).splitlines()
        assert printed == [nix_add(tmp_path, p) for p in items]
        for item, store_path in zip(items, printed, strict=True):
            assert nixcas(client_store, *remote, "dump-path", store_path).stdout == nix_dump(tmp_path, item)
        assert daemon.stop() == 0
    assert not client_store.exists()  # nothing was stored locally
    # the daemon's embedded store has everything, also when read directly
    daemon_store = tmp_path / "daemon-store"
    for item, store_path in zip(items, printed, strict=True):
        assert nixcas(daemon_store, "dump-path", store_path).stdout == nix_dump(tmp_path, item)


def test_copy_orders_references_first_and_refuses_missing_ones(
    tmp_path: Path, nix_closure: tuple[Path, str, list[dict[str, object]]]
) -> None:
    nix_store_dir, top, infos = nix_closure
    by_path = {str(i["path"]): i for i in infos}
    exported = parse_path_infos(infos)
    ordered = [str(e.store_path) for e in references_first(reversed(exported))]
    for position, path in enumerate(ordered):
        for ref in by_path[path]["references"]:  # type: ignore[attr-defined]
            assert ordered.index(ref) < position
    store = tmp_path / "store"
    only_top = [by_path[top]]
    result = nixcas(store, "copy", "--nix-store-dir", str(nix_store_dir), input=json.dumps(only_top).encode())
    assert result.returncode == 1
    assert "neither in the input nor in the store" in result.stderr.decode()
    assert nixcas(store, "path-info", top).returncode == 1


def test_remote_path_infos_with_local_blobs(tmp_path: Path) -> None:
    """Mixed services: the NAR hash is computed locally (the daemon has none of the blobs)."""
    items = sources(tmp_path)[:3]
    with (
        short_tmpdir() as sockets,
        running_daemon(
            "-l", str(sockets / "d.sock"), store=tmp_path / "daemon-store", log=tmp_path / "daemon.log"
        ) as daemon,
    ):
        store = tmp_path / "local"
        printed = ok(nixcas(store, "--path-info-service-addr", daemon.client_url(), "import", *map(str, items)))
        assert printed.splitlines() == [nix_add(tmp_path, p) for p in items]


def test_dump_path_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(4 << 20))
    store = tmp_path / "store"
    store_path = ok(nixcas(store, "import", str(big))).strip()
    command = [sys.executable, "-m", "nixcas.cli.main", "--store-dir", str(store), "dump-path", store_path]
    dump = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert dump.stdout is not None
    assert len(dump.stdout.read(10)) == 10
    dump.stdout.close()
    assert dump.wait(timeout=60) == 141
    assert dump.stderr is not None
    assert dump.stderr.read() == b""


def test_copy_refuses_a_content_address_that_does_not_fit(
    tmp_path: Path, nix_closure: tuple[Path, str, list[dict[str, object]]]
) -> None:
    nix_store_dir, _, infos = nix_closure
    # every CA Nix reported fits its path (text paths with references, a source tree)
    for exported in parse_path_infos(infos):
        check_content_address(exported)
    by_path = {str(i["path"]): i for i in infos}
    leaf = next(p for p, i in by_path.items() if not i["references"] and str(i["ca"]).startswith("text:"))
    by_path[leaf]["ca"] = "text:sha256:" + "1" * 52
    store = tmp_path / "store"
    result = nixcas(store, "copy", "--nix-store-dir", str(nix_store_dir), input=json.dumps(infos).encode())
    assert result.returncode == 1
    assert "content address" in result.stderr.decode()
    assert nixcas(store, "path-info", leaf).returncode == 1
