"""Store maintenance: ``gc``, ``delete``, ``fsck``, and the castore pins (``castore pin|unpin|pins``)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from nixcas.api import Store
from nixcas.castore.fsck import Problem
from nixcas.castore.gc import KINDS, GcReport, WriteLeases, parse_duration
from nixcas.castore.pins import PinService, validate_pin_name
from nixcas.cli.common import EXIT_FAILURE, LEASES_DIR, Settings, parse_digest, pass_settings, run
from nixcas.cli.store import parse_store_path
from nixcas.errors import ConfigurationError, NixcasError, NotFoundError
from nixcas.store.fsck import FsckReport, RepairSource, fsck
from nixcas.store.gc import collect_garbage, delete_paths

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = ["delete", "fsck_command", "gc", "pin", "pins", "unpin"]


def pins_of(store: Store) -> PinService:
    assert store.pins is not None  # opened with_pins
    return store.pins


class _Bar:
    """GC/fsck progress on a terminal: one line per phase, a spinner or a bar."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: object | None = None

    def phase(self, name: str, total: int | None) -> None:
        if self._task is not None:
            self._progress.update(self._task, visible=False)  # type: ignore[arg-type]
        self._task = self._progress.add_task(name, total=total)

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)  # type: ignore[arg-type]


class _Quiet:
    def phase(self, name: str, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


@contextmanager
def progress_display() -> Iterator[_Bar | _Quiet]:
    if not sys.stderr.isatty():
        yield _Quiet()
        return
    from rich.console import Console  # loaded only for a terminal
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        yield _Bar(progress)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


PLURAL = {
    "directory": "directories",
    "blob": "blobs",
    "chunk": "chunks",
    "outboard": "outboards",
    "temporary": "temp files",
}


def gc_summary(report: GcReport) -> list[str]:
    verb = "would free" if report.dry_run else "freed"
    lines = []
    for kind in KINDS:
        k = report.kinds[kind]
        counts = f"{PLURAL[kind]:<12} {verb} {k.freed:>8} ({human_bytes(k.freed_bytes):>10})"
        if kind != "temporary":
            counts += f"; {k.live} live, {k.young} kept as younger than the cutoff"
        lines.append(counts)
    lines.append(f"{'total':<12} {verb} {report.freed:>8} ({human_bytes(report.freed_bytes):>10})")
    if report.missing_directories:
        lines.append(f"warning: {report.missing_directories} referenced directories are missing (run nixcas fsck)")
    return lines


@click.command()
@click.option("--dry-run", is_flag=True, help="Report what would be freed; delete nothing.")
@click.option(
    "--grace",
    default="1h",
    show_default=True,
    metavar="DURATION",
    help="Keep everything written or re-put within this long (0s, 30m, 1h, 2d, 1h30m).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@pass_settings
def gc(settings: Settings, dry_run: bool, grace: str, as_json: bool) -> None:
    """Delete every blob, chunk and directory no PathInfo or pin reaches (older than --grace)."""
    try:
        grace_ns = parse_duration(grace)
    except ConfigurationError as e:
        raise click.BadParameter(str(e), param_hint="--grace") from None

    async def go() -> GcReport:
        leases = WriteLeases(settings.store_root() / LEASES_DIR)
        async with await settings.open_store(with_pathinfo=True, with_pins=True) as store:
            with progress_display() as bar:
                report, roots = await collect_garbage(
                    store.blobs,
                    store.directories,
                    store.pathinfos,
                    pins_of(store),
                    leases,
                    grace_ns=grace_ns,
                    dry_run=dry_run,
                    progress=bar,
                    shared=store.shared,
                )
            if not as_json:
                click.echo(f"roots: {roots.pathinfos} path infos, {roots.pins} pins", err=True)
            return report

    started = time.time()
    report = run(go)
    if not dry_run:  # for the metrics of the servers on this store (nixcas_gc_*)
        from nixcas.ops.stats import record_gc

        try:
            record_gc(settings.store_root(), report.freed_bytes, started)
        except OSError as e:
            click.echo(f"nixcas: warning: cannot record this collection for the metrics: {e}", err=True)
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        for line in gc_summary(report):
            click.echo(line)


@click.command()
@click.argument("store_paths", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Delete even paths that other PathInfos still refer to.")
@click.option("--json", "as_json", is_flag=True, help='Print {"deleted": [...]} (store paths).')
@pass_settings
def delete(settings: Settings, store_paths: tuple[str, ...], force: bool, as_json: bool) -> None:
    """Remove the PathInfos of STORE_PATHS (their data is freed by the next gc)."""
    paths = [parse_store_path(p) for p in store_paths]

    async def go() -> None:
        async with await settings.open_store(with_pathinfo=True) as store:
            assert store.pathinfos is not None
            deleted = [str(info.store_path) for info in await delete_paths(store.pathinfos, paths, force=force)]
            if as_json:
                click.echo(json.dumps({"deleted": deleted}))
            for path in [] if as_json else deleted:
                click.echo(f"deleted {path}")

    run(go)


async def _repair_source(url: str) -> Store:
    """``--repair-from``: a service URL (all three services there, e.g. a daemon) or a store directory."""
    if "://" not in url and not os.path.isdir(url):
        raise ConfigurationError(f"--repair-from {url!r}: not a store directory or a service URL")
    if "://" in url:
        return await Store.open(
            blob_service_url=url, directory_service_url=url, pathinfo_service_url=url, with_pathinfo=True
        )
    return await Store.open(url, with_pathinfo=True)


@click.command("fsck")
@click.option("--check-contents", is_flag=True, help="Read back and re-hash every blob and chunk.")
@click.option("--check-nar", is_flag=True, help="Render every path's NAR and compare its NarHash and NarSize.")
@click.option(
    "--repair-from",
    metavar="URL|DIR",
    help="Fetch damaged or missing objects from this store (a store directory or a daemon URL), verified.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@pass_settings
def fsck_command(
    settings: Settings, check_contents: bool, check_nar: bool, repair_from: str | None, as_json: bool
) -> None:
    """Verify the store; print each problem with its path; exit 1 if anything is (still) wrong."""

    async def go() -> FsckReport:
        async with await settings.open_store(with_pathinfo=True, with_pins=True) as store:
            pins = pins_of(store)
            source = await _repair_source(repair_from) if repair_from is not None else None
            try:
                with progress_display() as bar:
                    bar.phase("checking", None)

                    def show(p: Problem) -> None:
                        if not as_json:
                            click.echo(str(p))

                    return await fsck(
                        store.blobs,
                        store.directories,
                        store.pathinfos,
                        pins,
                        check_contents=check_contents,
                        check_nar=check_nar,
                        repair_from=None
                        if source is None
                        else RepairSource(source.blobs, source.directories, source.pathinfos),
                        on_problem=show,
                        on_object=lambda: bar.advance(1),
                    )
            finally:
                if source is not None:
                    await source.close()

    report = run(go)
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        for p in report.repaired:
            click.echo(f"repaired: {p}")
        if repair_from is not None:
            for p in report.remaining:
                click.echo(f"not repaired: {p}")
        click.echo(
            f"checked {report.checked_paths} paths, {report.checked_objects} objects: "
            f"{len(report.found)} problems, {len(report.repaired)} repaired, {len(report.remaining)} remaining",
            err=True,
        )
    if report.remaining:
        sys.exit(EXIT_FAILURE)


@click.command()
@click.argument("name")
@click.argument("digest")
@pass_settings
def pin(settings: Settings, name: str, digest: str) -> None:
    """Keep DIGEST (a directory with its closure, or a blob) through GC, under NAME."""
    target = parse_digest(digest)
    try:
        validate_pin_name(name)
    except NixcasError as e:
        raise click.BadParameter(str(e), param_hint="NAME") from None

    async def go() -> None:
        async with await settings.open_store(with_pins=True) as store:
            if await store.directories.get(target) is None and not await store.blobs.has(target):
                raise NotFoundError(f"{target.hex()}: no such directory or blob in the store")
            old = await pins_of(store).pin(name, target)
        if old is not None and old.digest != target:
            click.echo(f"moved pin {name} from {old.digest.hex()} to {target.hex()}", err=True)

    run(go)


@click.command()
@click.argument("name")
@pass_settings
def unpin(settings: Settings, name: str) -> None:
    """Remove the pin NAME (its objects are freed by the next gc unless reachable otherwise)."""

    async def go() -> None:
        async with await settings.open_store(with_pins=True) as store:
            if not await pins_of(store).unpin(name):
                raise NotFoundError(f"no pin named {name!r}")

    run(go)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_settings
def pins(settings: Settings, as_json: bool) -> None:
    """List the pins: NAME DIGEST CREATED."""

    async def go() -> None:
        async with await settings.open_store(with_pins=True) as store:
            for p in await pins_of(store).list():
                created = datetime.fromtimestamp(p.created_ns / 1e9, UTC).isoformat(timespec="seconds")
                if as_json:
                    click.echo(json.dumps({"name": p.name, "digest": p.digest.hex(), "created": created}))
                else:
                    click.echo(f"{p.name}\t{p.digest.hex()}\t{created}")

    run(go)
