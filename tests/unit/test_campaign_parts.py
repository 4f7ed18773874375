"""Pure parts of campaigns: audience filters and what a worker heard on nudge.control."""

from __future__ import annotations

import pytest

from shared.contract import CampaignControl
from shared.errors import InvalidMessage
from workers.runtime.control import Control
from workers.store import audiences


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("tier=vip", {"attribute": "tier", "op": "eq", "values": ["vip"]}),
        ("tier != free", {"attribute": "tier", "op": "ne", "values": ["free"]}),
        ("lang in en, fr", {"attribute": "lang", "op": "in", "values": ["en", "fr"]}),
        ("beta exists", {"attribute": "beta", "op": "exists"}),
    ],
)
def test_audience_filters_parse_the_four_documented_forms(
    text: str, parsed: dict[str, object]
) -> None:
    assert audiences.parse_condition(text) == parsed


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("tier~vip", "expected ATTRIBUTE=VALUE"),
        ("tier=", "no value after '='"),
        ("lang in en,,fr", "empty value in the list"),
        ("9lives=yes", "expected ATTRIBUTE=VALUE"),
    ],
)
def test_a_bad_audience_filter_is_refused_naming_the_valid_forms(text: str, why: str) -> None:
    with pytest.raises(InvalidMessage, match=why):
        audiences.parse_condition(text)


def test_an_empty_id_list_is_refused() -> None:
    with pytest.raises(InvalidMessage, match="the list of external ids is empty"):
        audiences.explicit([" ", ""])


def _heard(control: Control, action: str, round_: int) -> None:
    control.hear(
        CampaignControl.model_validate({"campaign_id": 7, "action": action, "round": round_})
    )


def test_a_worker_stops_a_campaign_it_heard_paused_until_it_hears_resume() -> None:
    control = Control()
    control.observe(7, 1)
    assert control.stopped(7, 1) is None
    _heard(control, "pause", 1)
    assert control.stopped(7, 1) == "pause"
    assert control.stopped(8, 1) is None
    _heard(control, "resume", 2)
    assert control.stopped(7, 2) is None


def test_a_pause_heard_after_the_campaign_moved_to_a_newer_round_is_ignored() -> None:
    control = Control()
    control.observe(7, 3)  # read from Postgres: resumed into round 3
    _heard(control, "pause", 2)  # a late announcement of an older pause
    assert control.stopped(7, 3) is None
    _heard(control, "cancel", 3)
    assert control.stopped(7, 3) == "cancel"
