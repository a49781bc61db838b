"""Operating a running nixcas: log setup, access logs, Prometheus metrics, OpenTelemetry traces.

Only :mod:`nixcas.ops.logs` and :mod:`nixcas.ops.stats` are light; the rest is
imported by servers alone (``prometheus_client`` and OpenTelemetry load there).
"""
