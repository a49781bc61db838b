"""Start-up: each command imports only what it uses (issue "[perf]", part 3).

Every command runs in a child process under a small wrapper that writes the
names in ``sys.modules`` at exit, so a module-level import of something heavy
anywhere on a command's path fails here.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from nixcas.testing.daemon import clean_env

ALWAYS_HEAVY = ("grpc", "aiohttp", "numpy", "obstore", "psycopg", "psycopg_pool", "rich", "cryptography")
"""Never loaded by --version, castore ls/cat or path-info on the embedded store."""
FAST_PATH_HEAVY = ("asyncio", "click", "google", "zstandard", "concurrent", "pyfastcdc")
"""Not loaded either by path-info, castore ls and castore cat on the embedded store (the fast path, nixcas.cli.fast)."""
MODEL_HEAVY = ("typing", "dataclasses", "inspect")
"""Not loaded by the data model (nodes, store paths, PathInfo): ~10 ms of a fast path's start (nixcas._record)."""

WRAPPER = """
import atexit, sys

out = sys.argv.pop(1)
sys.argv[0] = "nixcas"
atexit.register(lambda: open(out, "w").write("\\n".join(sorted(sys.modules))))
from nixcas.cli.main import main
main()
"""


def run_recording(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[bytes], set[str]]:
    """``nixcas ARGS`` in a child process (``env``: more variables); its result and the modules loaded at exit."""
    out = tmp_path / "modules.txt"
    out.unlink(missing_ok=True)
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(out), *args],
        capture_output=True,
        env={**clean_env(), **(env or {})},
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result, set(out.read_text().split("\n"))


def loaded(modules: set[str], *tops: str) -> list[str]:
    """Those of ``tops`` (top-level package names) that are in ``modules``."""
    return sorted({m.split(".")[0] for m in modules} & set(tops))


def nixcas(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "nixcas.cli.main", *args], capture_output=True, env=clean_env(), check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str, str]:
    """An embedded store holding a small tree as a store path: (store dir, root digest, a blob digest, store path)."""
    root = tmp_path_factory.mktemp("startup")
    tree = root / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_bytes(b"hello\n")
    (tree / "sub" / "b.txt").write_bytes(b"world\n")
    (tree / "link").symlink_to("a.txt")
    store_dir = root / "store"
    store_path = nixcas("--store-dir", str(store_dir), "import", str(tree)).strip()
    info = json.loads(nixcas("--store-dir", str(store_dir), "path-info", "--json", store_path))
    digest = info["rootNode"]["digest"]
    listing = [
        json.loads(line)
        for line in nixcas("--store-dir", str(store_dir), "castore", "ls", "--json", digest).splitlines()
    ]
    blob = next(e["digest"] for e in listing if e["name"] == "a.txt")
    return store_dir, digest, blob, store_path


def test_import_loads_no_protobuf(tmp_path: Path) -> None:
    """``import`` writes its Directory messages and its PathInfo record without protobuf (~30 ms of start-up),
    and finds ``syncfs`` without running ldconfig."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a").write_bytes(b"a\n")
    (tree / "link").symlink_to("sub/a")
    result, modules = run_recording(tmp_path, "--store-dir", str(tmp_path / "store"), "import", str(tree))
    assert result.stdout.decode().startswith("/nix/store/")
    assert loaded(modules, *ALWAYS_HEAVY, "google") == []
    assert [m for m in modules if m.startswith("nixcas._proto")] == []
    assert "ctypes.util" not in modules  # find_library runs ldconfig: ~7 ms for a symbol the process has


def test_version_loads_neither_click_nor_asyncio_nor_protobuf(tmp_path: Path) -> None:
    result, modules = run_recording(tmp_path, "--version")
    assert result.stdout == f"nixcas, version {importlib.metadata.version('nixcas')}\n".encode()
    assert loaded(modules, *ALWAYS_HEAVY, "asyncio", "google", "click", "sqlite3", "blake3") == []
    assert not [
        m for m in modules if m.startswith("nixcas.") and m not in ("nixcas._lazy", "nixcas.cli", "nixcas.cli.main")
    ]


def test_version_answer_is_clicks(tmp_path: Path) -> None:
    """The early --version answer is the one click's version option gives (reached after another option)."""
    fast, _ = run_recording(tmp_path, "--version")
    through_click, modules = run_recording(tmp_path, "--store-dir", str(tmp_path / "unused"), "--version")
    assert "click" in modules
    assert fast.stdout == through_click.stdout


def store_args(how: str, store_dir: Path, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """The store given by ``--store-dir``, or the default store (``$XDG_DATA_HOME/nixcas``): (args, environment)."""
    if how == "option":
        return ["--store-dir", str(store_dir)], {}
    data_home = tmp_path / "data"
    data_home.mkdir(exist_ok=True)
    (data_home / "nixcas").symlink_to(store_dir)
    return [], {"XDG_DATA_HOME": str(data_home)}


@pytest.mark.parametrize("how", ["option", "default"])
def test_castore_ls_loads_nothing_heavy_and_no_nix_layer(
    tmp_path: Path, store: tuple[Path, str, str, str], how: str
) -> None:
    store_dir, digest, blob, _ = store
    args, env = store_args(how, store_dir, tmp_path)
    result, modules = run_recording(tmp_path, *args, "castore", "ls", digest, env=env)
    lines = result.stdout.decode().splitlines()
    assert [line.split(maxsplit=1)[0] for line in lines] == ["file", "symlink", "dir"]
    assert lines[0].startswith(f"file    {blob}") and lines[0].endswith(" a.txt")
    assert lines[1].endswith(" link -> a.txt")
    assert lines[2].endswith(" sub")
    assert loaded(modules, *ALWAYS_HEAVY, *FAST_PATH_HEAVY, *MODEL_HEAVY) == []
    assert [m for m in modules if m.startswith("nixcas.store")] == []
    assert [
        m for m in modules if m.startswith("nixcas.cli.") and m.rpartition(".")[2] in ("store", "gc", "daemon")
    ] == []


@pytest.mark.parametrize("how", ["option", "default"])
def test_castore_cat_loads_nothing_heavy_nor_protobuf(
    tmp_path: Path, store: tuple[Path, str, str, str], how: str
) -> None:
    store_dir, _, blob, _ = store
    args, env = store_args(how, store_dir, tmp_path)
    result, modules = run_recording(tmp_path, *args, "castore", "cat", blob, env=env)
    assert result.stdout == b"hello\n"
    assert loaded(modules, *ALWAYS_HEAVY, *FAST_PATH_HEAVY, "dataclasses", "typing", "re") == []
    assert [m for m in modules if m.startswith("nixcas.store")] == []


@pytest.mark.parametrize(("how", "json"), [("option", False), ("default", False), ("option", True)])
def test_path_info_loads_nothing_heavy_nor_nar_code(
    tmp_path: Path, store: tuple[Path, str, str, str], how: str, json: bool
) -> None:
    store_dir, digest, _, store_path = store
    args, env = store_args(how, store_dir, tmp_path)
    result, modules = run_recording(tmp_path, *args, "path-info", *(["--json"] if json else []), store_path, env=env)
    assert (
        f"type=directory digest={digest}" in result.stdout.decode() or f'"digest": "{digest}"' in result.stdout.decode()
    )
    assert loaded(modules, *ALWAYS_HEAVY, *FAST_PATH_HEAVY, *MODEL_HEAVY) == []
    assert [m for m in modules if m.startswith("nixcas.store.nar")] == []


def test_dump_path_loads_nothing_heavy_nor_dataclasses(tmp_path: Path, store: tuple[Path, str, str, str]) -> None:
    """The fast ``dump-path`` builds nodes and a PathInfo: the data model loads neither dataclasses nor inspect."""
    store_dir, _, _, store_path = store
    result, modules = run_recording(tmp_path, "--store-dir", str(store_dir), "dump-path", store_path)
    assert result.stdout.startswith(b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1")
    assert b"hello\n" in result.stdout and b"world\n" in result.stdout
    assert loaded(modules, *ALWAYS_HEAVY, *FAST_PATH_HEAVY, *MODEL_HEAVY) == []


def test_path_info_opens_the_path_info_service_alone(tmp_path: Path, store: tuple[Path, str, str, str]) -> None:
    """The embedded store's SQLite path infos need no blob or directory service: their backends stay unloaded."""
    store_dir, digest, _, store_path = store
    for extra in ([], ["--path-info-service-addr", f"sqlite://{store_dir / 'pathinfo.sqlite'}"]):
        result, modules = run_recording(tmp_path, "--store-dir", str(store_dir), *extra, "path-info", store_path)
        assert f"RootNode: type=directory digest={digest}" in result.stdout.decode()
        backends = ("nixcas.castore.blob.", "nixcas.castore.dirs.", "nixcas.castore.objectstore")
        assert [m for m in modules if m.startswith(backends)] == []
        assert loaded(modules, "zstandard", "pyfastcdc") == []


def test_path_info_through_a_composition_opens_the_whole_store(
    tmp_path: Path, store: tuple[Path, str, str, str]
) -> None:
    """A composition file (whose path info service may use the others) still opens every root service."""
    store_dir, digest, _, store_path = store
    composition = tmp_path / "composition.toml"
    composition.write_text(
        "[blobservices.root]\n"
        'type = "objectstore"\n'
        f'object_store_url = "file://{store_dir / "blobs"}"\n'
        "[directoryservices.root]\n"
        'type = "sqlite"\n'
        f'path = "{store_dir / "directories.sqlite"}"\n'
        "[pathinfoservices.root]\n"
        'type = "sqlite"\n'
        f'path = "{store_dir / "pathinfo.sqlite"}"\n'
    )
    result, modules = run_recording(tmp_path, "--composition", str(composition), "path-info", store_path)
    assert f"RootNode: type=directory digest={digest}" in result.stdout.decode()
    assert {"nixcas.castore.blob.local", "nixcas.castore.dirs.sqlite"} <= modules


def test_help_imports_no_subcommand(tmp_path: Path) -> None:
    for args in (["--help"], ["castore", "--help"]):
        result, modules = run_recording(tmp_path, *args)
        assert b"Commands:" in result.stdout
        assert sorted(m for m in modules if m.startswith("nixcas.cli.")) == sorted(
            {"nixcas.cli.main", "nixcas.cli.app", "nixcas.cli.common", "nixcas.cli.fast", "nixcas.cli.lazy"}
            | (
                {
                    "nixcas.cli.castore",
                    "nixcas.cli.mount",
                    "nixcas.cli.render",
                    "nixcas.cli.observe",
                    "nixcas.cli.prewalk",
                }
                if args[0] == "castore"
                else set()
            )
        )
        assert loaded(modules, *ALWAYS_HEAVY, "asyncio", "google") == []


@pytest.mark.parametrize("group_name", ["nixcas", "castore"])
def test_help_table_is_each_commands_own_short_help(group_name: str) -> None:
    """The short help kept in the lazy table is what each command says of itself; --help is unchanged by loading."""
    from nixcas.cli.app import cli
    from nixcas.cli.lazy import LazyGroup

    group = cli if group_name == "nixcas" else cli.get_command(click.Context(cli), "castore")
    assert isinstance(group, LazyGroup)
    ctx = click.Context(group, info_name=group_name)
    lazy_help = group.get_help(ctx)  # lazy entries not loaded yet (in this process: maybe some)
    assert group.lazy, "a lazy group with nothing lazy"
    for name, entry in group.lazy.items():
        command = group.get_command(ctx, name)
        assert command is not None, name
        assert command.name == name or name in group.commands
        assert entry.short_help == command.get_short_help_str(limit=10_000), name
    assert group.get_help(ctx) == lazy_help
    for name in group.lazy:
        assert f"  {name} " in lazy_help


def test_unknown_command_is_still_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nixcas.cli.main", "no-such-command"], capture_output=True, env=clean_env(), check=False
    )
    assert result.returncode == 2
    assert b"No such command 'no-such-command'" in result.stderr


@pytest.mark.parametrize("module", ["nixcas.castore", "nixcas.castore.digest", "nixcas.castore.nodes"])
def test_importing_castore_loads_no_nix_layer(module: str) -> None:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=clean_env())
    modules = out.stdout.split()
    forbidden = ("nixcas.store", "nixcas.registry", "nixcas.composition", "nixcas.config", "nixcas.api")
    assert [m for m in modules if m.startswith(forbidden)] == []
    assert loaded(set(modules), *ALWAYS_HEAVY, "google") == []


def test_lazy_exports_are_the_defining_modules_objects() -> None:
    import nixcas
    import nixcas.castore
    import nixcas.store.nar

    for package in (nixcas, nixcas.castore, nixcas.store.nar):
        for name in package.__all__:
            if name == "__version__":
                continue
            value = getattr(package, name)
            home = package._EXPORTS[name]
            module = sys.modules[home if "." in home else f"{package.__name__}.{home}"]
            assert value is getattr(module, name), (package.__name__, name)
            assert name in dir(package)
        with pytest.raises(AttributeError):
            package.no_such_name  # noqa: B018
