"""Broker addresses: ``NUDGE_AMQP_URL`` (and a producer's ``url``) may name several nodes of one
RabbitMQ cluster, comma-separated; connections try them in order and move to the next when
theirs goes (:func:`shared.amqp.connect`, :class:`producer.Producer`)."""

from __future__ import annotations

import urllib.parse

import pika

from shared.errors import ConfigError

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
