"""docs/events.md is the catalogue: every event kind and every signal is in it."""

from pathlib import Path

from backbone import signals
from backbone.events import EVENT_TYPES

DOC = (Path(__file__).resolve().parent.parent / "docs" / "events.md").read_text()


def test_every_event_kind_has_a_section():
    for cls in EVENT_TYPES:
        kind = cls.model_fields["kind"].default
        assert f"### `{kind}` (`{cls.__name__}`)" in DOC, kind


def test_every_signal_is_listed():
    names = {name for name in dir(signals) if name.startswith("on_")}
    for name in names:
        assert f"`{name}`" in DOC, name


def test_the_signal_count_is_right():
    assert f"a tuple of all {len(signals.ALL_SIGNALS)} signals" in DOC
