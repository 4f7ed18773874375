"""Broker addresses: a comma-separated list of a cluster's nodes, each checked."""

from __future__ import annotations

import pytest

from shared import brokers
from shared.errors import ConfigError


def test_a_list_of_addresses_is_split_in_order_and_trimmed() -> None:
    url = "amqp://u:p@a:5672/, amqp://u:p@b:5672/,amqps://u:p@c:5671/"
    assert brokers.addresses(url) == [
        "amqp://u:p@a:5672/",
        "amqp://u:p@b:5672/",
        "amqps://u:p@c:5671/",
    ]


def test_a_single_address_is_a_list_of_one() -> None:
    assert brokers.addresses("amqp://guest:guest@127.0.0.1:5672/") == [
        "amqp://guest:guest@127.0.0.1:5672/"
    ]


def test_a_bad_entry_is_named_by_position_without_its_password() -> None:
    with pytest.raises(ConfigError) as caught:
        brokers.addresses("amqp://u:secret@a:5672/,http://u:secret@b:5672/")
    message = str(caught.value)
    assert "broker address 2 of 2" in message
    assert "amqp:// or amqps://" in message
    assert "secret" not in message


def test_the_vhost_is_read_from_the_first_address() -> None:
    assert brokers.vhost("amqp://u:p@a/nudge%2Fprod,amqp://u:p@b/nudge%2Fprod") == "nudge/prod"
    assert brokers.vhost("amqp://u:p@a:5672/,amqp://u:p@b:5672/") == "/"


def test_pika_gets_one_parameter_set_per_address() -> None:
    params = brokers.pika_parameters(
        "amqp://u:p@a:5672/,amqp://u:p@b:5673/", connection_name="nudge-test"
    )
    assert [(p.host, p.port) for p in params] == [("a", 5672), ("b", 5673)]
    assert all(p.client_properties == {"connection_name": "nudge-test"} for p in params)
