"""Broker addresses: ``NUDGE_AMQP_URL`` (and a producer's ``url``) may name several nodes of one
RabbitMQ cluster, comma-separated; connections try them in order and move to the next when
theirs goes (:func:`shared.amqp.connect`, :class:`producer.Producer`)."""

from __future__ import annotations

import urllib.parse

import pika
import pika.exceptions

from shared.errors import BrokerError, BrokerUnavailable, ConfigError

SCHEMES = ("amqp://", "amqps://")


def addresses(url: str) -> list[str]:
    """The URLs of a comma-separated list, in order; raises :class:`ConfigError` naming the
    entry that is not an ``amqp://`` or ``amqps://`` URL."""
    parts = [part.strip() for part in url.split(",")]
    for i, part in enumerate(parts, 1):
        if not part.startswith(SCHEMES):
            shown = part if "@" not in part else part.split("@", 1)[1]
            raise ConfigError(
                f"broker address {i} of {len(parts)} ({shown!r}) must start with amqp:// or "
                "amqps:// (several addresses are separated by commas)"
            )
    return parts


def vhost(url: str) -> str:
    """The virtual host the addresses of ``url`` name (the first one's: a cluster has the same
    virtual hosts on every node)."""
    path = urllib.parse.urlsplit(addresses(url)[0]).path
    return urllib.parse.unquote(path[1:]) or "/"


def pika_parameters(url: str, **client_properties: str) -> list[pika.URLParameters]:
    """pika's parameters for each address: ``pika.BlockingConnection`` tries them in order."""
    parameters = []
    for address in addresses(url):
        p = pika.URLParameters(address)
        if client_properties:
            p.client_properties = dict(client_properties)
        parameters.append(p)
    return parameters


def publish_confirmed(
    url: str,
    exchange: str,
    routing_key: str,
    body: bytes,
    *,
    message_id: str,
    content_type: str,
    connection_name: str,
) -> None:
    """Publish one persistent message with pika and wait for its confirm, on a connection of
    its own: for a command that publishes once and should not pay for an event loop's
    imports (``nudge campaign pause``). Raises :class:`BrokerUnavailable` when no node
    answers, :class:`BrokerError` when the publish was not confirmed."""
    try:
        connection = pika.BlockingConnection(pika_parameters(url, connection_name=connection_name))
    except pika.exceptions.AMQPError as exc:
        raise BrokerUnavailable(f"cannot connect to RabbitMQ: {exc!r}") from exc
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange,
            routing_key,
            body,
            pika.BasicProperties(content_type=content_type, delivery_mode=2, message_id=message_id),
        )
    except pika.exceptions.AMQPError as exc:
        raise BrokerError(f"{message_id} was not confirmed: {exc!r}") from exc
    finally:
        if connection.is_open:
            connection.close()
