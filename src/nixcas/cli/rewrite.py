"""``nixcas castore rewrite-directories``: convert the store to the other directory size rule."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace

import click

from nixcas.castore.sizerule import SIZE_RULE_NAMES
from nixcas.cli.common import Settings, pass_settings, run

KILL_AFTER_ENV = "NIXCAS_TEST_REWRITE_KILL_AFTER"
"""Test hook: the process kills itself (SIGKILL) after this many writes, to show a re-run finishes the job."""


@click.command("rewrite-directories")
@click.option("--to", "target", type=click.Choice(SIZE_RULE_NAMES), required=True, help="The rule to convert to.")
@click.option("--dry-run", is_flag=True, help="Count what would be converted; write nothing.")
@click.option(
    "--nar-index",
    type=click.Path(dir_okay=False),
    help="The bridge's NAR index to convert too [default: STORE_DIR/nar-bridge.sqlite, if it exists].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@pass_settings
def rewrite_directories_command(
    settings: Settings, target: str, dry_run: bool, nar_index: str | None, as_json: bool
) -> None:
    """Convert the store's directories to the other size rule (snix 2026 or tvix).

    Every referenced directory tree is written again under the rule and the
    references to it (PathInfos, pins, the bridge's NAR index) are switched;
    the store then records the rule.  Safe to interrupt: running it again finishes the job.
    The old directories are left for `nixcas gc`.  Stop other writers first.
    """
    from nixcas.castore.sizerule import SIZE_RULE_ENV, SizeRule
    from nixcas.store.narindex import NarIndex
    from nixcas.store.rewrite import RewriteReport, rewrite_directories

    rule = SizeRule(target)
    # the store is opened with whatever rule it records: asking for one would refuse a store mid-conversion
    os.environ.pop(SIZE_RULE_ENV, None)
    settings = replace(settings, directory_size_rule=None)
    index_path = nar_index
    if index_path is None and (settings.store_root() / "nar-bridge.sqlite").exists():
        index_path = str(settings.store_root() / "nar-bridge.sqlite")
    kill_after = int(os.environ.get(KILL_AFTER_ENV) or 0)

    def step(done: int) -> None:
        if kill_after and done >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    async def go() -> RewriteReport:
        index = NarIndex(index_path) if index_path is not None else None
        try:
            async with settings.open_store_to_write(with_pathinfo=True, with_pins=True) as store:
                return await rewrite_directories(
                    store.directories,
                    rule,
                    pathinfos=store.pathinfos,
                    pins=store.pins,
                    nar_index=index,
                    dry_run=dry_run,
                    step=step,
                )
        finally:
            if index is not None:
                await index.close()

    report = run(go)
    if as_json:
        click.echo(json.dumps(report.as_dict()))
        return
    if report.source is report.target and not report.converted and not report.missing:
        click.echo(f"the store already follows the {report.target} rule: nothing to do")
        return
    verb = "would convert" if dry_run else "converted"
    click.echo(
        f"{report.source} -> {report.target}: {verb} {report.converted} of {report.roots} roots "
        f"({report.directories_written} directories), {report.already} already converted, "
        f"{report.unchanged} the same under both rules, {len(report.missing)} missing"
        + ("; the store now follows the " + str(report.target) + " rule" if report.recorded else "")
    )
    for where in report.missing[:20]:
        click.echo(f"missing: {where}", err=True)
