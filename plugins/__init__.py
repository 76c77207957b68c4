"""Observability plugins for backbone: ``logging``, ``otel`` (tracing), ``metrics`` and
``history``.  Each subscribes to :mod:`backbone.signals`, only observes, and is enabled
on its own (``Server(plugins=[...])`` or ``BACKBONE_PLUGINS=logging,metrics``)."""
