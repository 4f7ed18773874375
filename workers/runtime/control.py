"""``nudge.control``: every worker hears at once that a campaign was paused, resumed or
cancelled, so it stops sending that campaign's recipients before its next chunk.

Each worker binds its own exclusive, auto-deleted queue to the fanout exchange (not part of
the static topology: it lives as long as the worker's connection). What it hears is a hint
that saves a database round trip per chunk; Postgres stays the truth. A dispatch worker reads
the campaign's status before every batch, and the claim itself refuses recipients of a paused
campaign, so a worker that missed an announcement still stops at its next claim.

Announcements carry the planning round: a pause of round 3 heard after the campaign was
resumed into round 4 is stale and ignored.
"""

from __future__ import annotations

import uuid

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection, ExchangeType

from shared import contract
from shared.amqp import Outgoing, Publisher
from shared.contract import CampaignControl
from shared.errors import InvalidMessage
from shared.topology import CONTROL_EXCHANGE

log = structlog.get_logger("nudge.control")


async def announce(publisher: Publisher, control: CampaignControl) -> None:
    """Publish ``control`` to every worker, with a confirm. Not mandatory: with no worker
    running, nobody needs to hear it."""
    await publisher.publish(
        Outgoing(
            CONTROL_EXCHANGE,
            "",
            contract.encode(control),
            f"control-{control.campaign_id}-{control.action}-{control.round}",
            mandatory=False,
        )
    )


class Control:
    """What this worker has heard: campaigns stopped (paused or cancelled) per round."""

    def __init__(self) -> None:
        self._stopped: dict[int, tuple[str, int]] = {}
        self._rounds: dict[int, int] = {}

    async def listen(self, connection: AbstractRobustConnection) -> None:
        """Bind a private queue to ``nudge.control`` and start hearing."""
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            CONTROL_EXCHANGE, ExchangeType.FANOUT, durable=True
        )
        # Named under nudge.* (not left to the client library): the worker user may only
        # declare Nudge's own names (shared/topology.py, users).
        queue = await channel.declare_queue(
            f"{CONTROL_EXCHANGE}.{uuid.uuid4().hex}", exclusive=True, auto_delete=True
        )
        await queue.bind(exchange)
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            control = contract.decode(
                CampaignControl, message.body, content_type=message.content_type
            )
        except InvalidMessage as exc:
            log.warning("ignored control message", reason=exc.reason)
            return
        self.hear(control)

    def hear(self, control: CampaignControl) -> None:
        """Apply an announcement."""
        log.info(
            "campaign control",
            campaign_id=control.campaign_id,
            action=control.action,
            round=control.round,
        )
        self.observe(control.campaign_id, control.round)
        if control.round < self._rounds.get(control.campaign_id, 0):
            return
        if control.action == "resume":
            self._stopped.pop(control.campaign_id, None)
        else:
            self._stopped[control.campaign_id] = (control.action, control.round)

    def observe(self, campaign_id: int, round_: int) -> None:
        """The campaign is known to be in ``round_`` (read from Postgres): older stops no
        longer apply."""
        if round_ > self._rounds.get(campaign_id, 0):
            self._rounds[campaign_id] = round_
            stop = self._stopped.get(campaign_id)
            if stop is not None and stop[1] < round_:
                del self._stopped[campaign_id]

    def stopped(self, campaign_id: int, round_: int) -> str | None:
        """``pause`` or ``cancel`` if this worker heard so for ``round_`` (or later)."""
        stop = self._stopped.get(campaign_id)
        return stop[0] if stop is not None and stop[1] >= round_ else None
