"""The log channel: writes each delivery as a structured log line. For demos and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from workers.channels import Delivery, SendResult

log = structlog.get_logger("nudge.channel.log")


class LogSender:
    """Always succeeds."""

    name = "log"
    batch_size = 500

    async def send(self, deliveries: Sequence[Delivery]) -> list[SendResult]:
        for delivery in deliveries:
            log.info(
                "delivered",
                message_id=delivery.message_id,
                contact=delivery.external_id,
                template=delivery.template,
                subject=delivery.content.subject,
                attempt=delivery.attempt,
            )
        return [SendResult.sent()] * len(deliveries)

    async def close(self) -> None:
        return None
