"""Observability plugins for backbone (logging, OpenTelemetry, metrics, history).

They subscribe to :mod:`backbone.signals` and only observe.  See issue "Observability
plugins" for the plan; nothing is implemented here yet.
"""
