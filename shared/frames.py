"""AMQP 0-9-1 frames of a persistent publish, marshalled in a few ``struct`` calls.

Both producers write a publish as three frames (``basic.publish``, the content header, the
body) and the drivers' generic marshalling (pika's, pamqp's) costs more CPU per message than
the rest of a publish. A service's publish always carries the same properties,
``content_type``, ``delivery_mode`` 2 and ``message_id``, so the header is built here; a
publish with anything else (headers, a priority) is marshalled by the driver instead.
"""

from __future__ import annotations

import struct

from shared.contract import CONTENT_TYPE, PERSISTENT

_METHOD, _HEADER, _BODY = 1, 2, 3
_END = b"\xce"
#: basic.publish is class 60, method 40; the content header's class is 60 too.
_BASIC, _PUBLISH = 60, 40
#: property flags: content_type (bit 15), delivery_mode (bit 12), message_id (bit 7).
_FLAGS = 0x8000 | 0x1000 | 0x0080
_CONTENT_TYPE = bytes([len(CONTENT_TYPE)]) + CONTENT_TYPE.encode()
_FRAME = struct.Struct(">BHI")
#: A content header frame's start: the frame's type, channel and size, then the header's
#: class, weight, body size and property flags.
_HEADER_START = struct.Struct(">BHIHHQH")
#: content_type and delivery_mode, the properties before message_id.
_PROPERTIES = _CONTENT_TYPE + bytes([PERSISTENT])
#: A content header's size but for the message id's bytes: class, weight, body size and
#: flags (14 bytes), the properties, the message id's length byte.
_HEADER_FIXED = 14 + len(_PROPERTIES) + 1
_LENGTHS = [bytes([n]) for n in range(256)]


def _short(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"{value[:20]!r}...: more than 255 bytes, too long for a short string")
    return bytes([len(raw)]) + raw


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME.pack(kind, channel, len(payload)) + payload + _END


def publish_method(channel: int, exchange: str, routing_key: str, *, mandatory: bool) -> bytes:
    """The ``basic.publish`` method frame (``immediate`` off)."""
    payload = (
        struct.pack(">HHH", _BASIC, _PUBLISH, 0)  # reserved ticket
        + _short(exchange)
        + _short(routing_key)
        + bytes([1 if mandatory else 0])
    )
    return _frame(_METHOD, channel, payload)


def content(channel: int, message_id: str, body: bytes, max_body: int) -> bytes:
    """The content header (``content_type`` JSON, persistent, ``message_id``) and body frames
    of one publish; ``max_body`` is the longest body frame payload the connection allows."""
    raw_id = message_id.encode()
    if len(raw_id) > 255:
        raise ValueError(
            f"{message_id[:20]!r}...: more than 255 bytes, too long for a short string"
        )
    size = len(body)
    parts = [
        _HEADER_START.pack(_HEADER, channel, _HEADER_FIXED + len(raw_id), _BASIC, 0, size, _FLAGS),
        _PROPERTIES,
        _LENGTHS[len(raw_id)],
        raw_id,
        _END,
    ]
    if size <= max_body:  # one body frame, or none for an empty body
        if size:
            parts += (_FRAME.pack(_BODY, channel, size), body, _END)
    else:
        parts += [
            _frame(_BODY, channel, body[at : at + max_body]) for at in range(0, size, max_body)
        ]
    return b"".join(parts)
