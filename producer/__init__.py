"""The publishing library services use. No database credentials needed.

>>> from producer import Producer
>>> with Producer("amqp://nudge-service:PASSWORD@rabbitmq:5672/") as nudge:
...     nudge.schedule("42", "trial_end", "webhook", delay=timedelta(days=7),
...                    exclude_events=["upgrade_subscription"])
"""

from producer.async_producer import AsyncProducer
from producer.requests import Request, Scheduled, Tracked, scheduled, tracked
from producer.sync_producer import Producer
from shared.errors import BrokerUnavailable, InvalidMessage, NudgeError, PublishNotConfirmed

__all__ = [
    "AsyncProducer",
    "BrokerUnavailable",
    "InvalidMessage",
    "NudgeError",
    "Producer",
    "PublishNotConfirmed",
    "Request",
    "Scheduled",
    "Tracked",
    "scheduled",
    "tracked",
]
