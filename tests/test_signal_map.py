"""``signals.SIGNAL_OF_KIND`` says on which signal each event kind is emitted; plugins
rely on it to listen to a few kinds only.  It must cover every kind and agree with the
emit calls in the core's source."""

import re
from pathlib import Path

from backbone import events, signals
from backbone.events import EVENT_TYPES

SOURCE = Path(__file__).resolve().parent.parent / "backbone"
EMIT = re.compile(r"signals\.emit\(\s*signals\.(on_\w+),\s*[^,]+,\s*(\w+)(?:\.\w+)?\(", re.S)
# the per-message steps: ``self._report(want, signals.on_x, "kind", row)`` (Link._report
# emits the step's event on that signal)
REPORT = re.compile(r"self\._report\(\s*\w+,\s*signals\.(on_\w+),\s*\"([\w.]+)\"", re.S)


def test_every_kind_has_a_signal():
    kinds = {cls.model_fields["kind"].default for cls in EVENT_TYPES}
    assert set(signals.SIGNAL_OF_KIND) == kinds
    assert all(s in signals.ALL_SIGNALS for s in signals.SIGNAL_OF_KIND.values())


def test_emit_calls_agree_with_the_map():
    seen = 0
    for path in SOURCE.glob("*.py"):
        for signal_name, class_name in EMIT.findall(path.read_text()):
            cls = getattr(events, class_name)
            kind = cls.model_fields["kind"].default
            assert signals.SIGNAL_OF_KIND[kind] is getattr(signals, signal_name), (
                f"{path.name}: {class_name} emitted on {signal_name}"
            )
            seen += 1
        for signal_name, kind in REPORT.findall(path.read_text()):
            assert kind in events.BATCHED_KINDS
            assert signals.SIGNAL_OF_KIND[kind] is getattr(signals, signal_name), (
                f"{path.name}: {kind} emitted on {signal_name}"
            )
            seen += 1
    # every kind is emitted somewhere (some in two places); batches by signals.flush_steps
    assert seen >= len(EVENT_TYPES) - 1
    assert signals.SIGNAL_OF_KIND["events.batched"] is signals.on_events_batched
