"""The ``reason`` label of ``nudge_dead_lettered_total`` takes a bounded set of values, whatever
field paths a sender's input produces."""

from __future__ import annotations

from workers.runtime.metrics import REASON_LABELS, reason_label


def test_a_reason_is_labelled_by_its_top_level_field() -> None:
    assert reason_label("contact.id: must not contain NUL characters (\\u0000)") == "contact"
    assert reason_label("data.any key at all: must not contain NUL") == "data"
    assert reason_label("due: contact 2 is not a recipient of message 1") == "due"
    assert reason_label("crash: KeyError raised by the nudge.due handler on each of 5 tries") == (
        "crash"
    )


def test_names_a_sender_makes_up_are_all_other() -> None:
    made_up = [f"field{i}: extra inputs are not permitted" for i in range(1000)]
    made_up += ["[0]: x", "", "\u2028data: x", "Data: x", "data\nx: y"]
    assert {reason_label(r) for r in made_up} == {"other"}
    assert len(REASON_LABELS) < 60
