"""What every serving command adds for operators: ``--metrics-listen-address`` and ``--otlp-endpoint``.

A serving command decorates itself with :func:`telemetry_options` and runs
inside :func:`telemetry` (which also switches logging to a server's defaults:
INFO, access lines on)::

    @click.command()
    @telemetry_options(metrics=True)
    def serve(..., metrics_listen_address: str | None, otlp_endpoint: str | None) -> None:
        with telemetry("nixcas-serve", metrics_listen_address, otlp_endpoint):
            ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from nixcas.cli.common import EXIT_USAGE, fail
from nixcas.errors import ConfigurationError

__all__ = ["telemetry", "telemetry_options"]


def telemetry_options(*, metrics: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--otlp-endpoint`` and, with ``metrics``, ``--metrics-listen-address`` (a server with no HTTP port)."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option(
            "--otlp-endpoint",
            envvar="NIXCAS_OTLP_ENDPOINT",
            metavar="URL",
            help="Export OpenTelemetry traces over OTLP/HTTP to URL (http://collector:4318); needs nixcas[otel].",
        )(f)
        if metrics:
            f = click.option(
                "--metrics-listen-address",
                metavar="ADDR",
                help="Serve Prometheus metrics at http://ADDR/metrics (host:port).",
            )(f)
        return f

    return decorate


@contextlib.contextmanager
def telemetry(
    service: str, metrics_listen_address: str | None, otlp_endpoint: str | None, store_root: Path | None = None
) -> Iterator[None]:
    """Server logging defaults, the metrics port and trace export for the block; bad options fail at once (exit 2).

    With ``store_root``, the metrics include what ``nixcas gc`` did to that store (``nixcas_gc_*``).
    """
    from nixcas.ops.logs import serving

    serving()
    if store_root is not None:
        from nixcas.ops.metrics import watch_store

        watch_store(store_root)
    with contextlib.ExitStack() as stack:
        try:
            if otlp_endpoint is not None:
                from nixcas.ops import tracing

                tracing.setup(otlp_endpoint, service)
                stack.callback(tracing.shutdown)
            if metrics_listen_address is not None:
                from nixcas.ops.metrics import start_metrics_server

                stack.enter_context(start_metrics_server(metrics_listen_address))
        except ConfigurationError as e:
            fail(str(e), EXIT_USAGE)
        yield
