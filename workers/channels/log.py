"""The log channel: writes each delivery as a structured log line. For demos and benchmarks."""

from __future__ import annotations

import structlog

from workers.channels import Delivery, SendResult

log = structlog.get_logger("nudge.channel.log")


class LogChannel:
    """Always succeeds."""

    name = "log"

    async def send(self, delivery: Delivery) -> SendResult:
        log.info(
            "delivered",
            message_id=delivery.message_id,
            contact=delivery.external_id,
            template=delivery.template,
            attempt=delivery.attempt,
        )
        return SendResult.sent()

    async def close(self) -> None:
        return None
