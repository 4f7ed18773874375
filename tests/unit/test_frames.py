"""shared.frames marshals a service's publish exactly as the drivers would."""

from __future__ import annotations

import pika
import pika.frame
import pika.spec
import pytest
from pamqp import commands as spec
from pamqp.frame import marshal
from pamqp.header import ContentHeader

from shared import frames


@pytest.mark.parametrize("message_id", ["k-1", "é" * 100])
@pytest.mark.parametrize("body", [b"", b"{}", b"x" * 300_000])
def test_publish_frames_are_byte_identical_to_pikas_and_pamqps(
    message_id: str, body: bytes
) -> None:
    method = pika.spec.Basic.Publish(
        exchange="nudge.intake", routing_key="schedule", mandatory=True
    )
    assert frames.publish_method(3, "nudge.intake", "schedule", mandatory=True) == (
        pika.frame.Method(3, method).marshal()
    )
    properties = pika.BasicProperties(
        content_type="application/json", delivery_mode=2, message_id=message_id
    )
    size = 131_064
    by_pika = pika.frame.Header(3, len(body), properties).marshal() + b"".join(
        pika.frame.Body(3, body[at : at + size]).marshal() for at in range(0, len(body), size)
    )
    assert frames.content(3, message_id, body, size) == by_pika
    header = ContentHeader(
        0,
        len(body),
        spec.Basic.Properties(
            content_type="application/json", delivery_mode=2, message_id=message_id
        ),
    )
    assert by_pika.startswith(marshal(header, 3))


def test_a_message_id_longer_than_an_amqp_short_string_is_refused() -> None:
    with pytest.raises(ValueError, match="255 bytes"):
        frames.content(1, "é" * 200, b"{}", 131_064)
