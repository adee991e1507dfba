"""RabbitMQ cluster settings: BROKER_URL listing several nodes, quorum queues and their arguments."""

from __future__ import annotations

import pika
import pytest

from service.amqp import node_parameters
from service.broker import DeadLetteringRabbitmqBroker, build_broker, delivery_count
from service.config import ConfigError, load_settings

SECRET = "s3cr3t-pw"
NODES = f"amqp://booking:{SECRET}@rabbit-0.rabbit:5672,rabbit-1.rabbit:5673,10.0.0.3/bookings"


def test_a_url_listing_nodes_gives_one_url_per_node_in_order() -> None:
    settings = load_settings({"BROKER_URL": NODES + "?heartbeat=30"})
    assert settings.broker_kind == "rabbitmq"
    assert settings.broker_urls == [
        f"amqp://booking:{SECRET}@rabbit-0.rabbit:5672/bookings?heartbeat=30",
        f"amqp://booking:{SECRET}@rabbit-1.rabbit:5673/bookings?heartbeat=30",
        f"amqp://booking:{SECRET}@10.0.0.3/bookings?heartbeat=30",
    ]
    params = node_parameters(settings.secret("broker_url"))
    assert [(p.host, p.port, p.virtual_host, p.heartbeat) for p in params] == [
        ("rabbit-0.rabbit", 5672, "bookings", 30),
        ("rabbit-1.rabbit", 5673, "bookings", 30),
        ("10.0.0.3", 5672, "bookings", 30),
    ]
    assert all(p.credentials.password == SECRET for p in params)


def test_a_single_node_url_is_one_node() -> None:
    url = f"amqp://guest:{SECRET}@127.0.0.1:5672/%2F"
    assert load_settings({"BROKER_URL": url}).broker_urls == [url]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            f"amqp://u:{SECRET}@h1:5672/v;amqp://u:{SECRET}@h2:5672/v",
            "BROKER_URL: list RabbitMQ nodes as amqp://user:pass@host1:port1,host2:port2/vhost",
        ),
        (
            f"amqp://u:{SECRET}@h1:5672/v,amqp://u:{SECRET}@h2:5672/v",
            "BROKER_URL: list RabbitMQ nodes as",
        ),
        (f"amqp://u:{SECRET}@h1:5672,,h2/v", "BROKER_URL: has no host"),
        (f"amqp://u:{SECRET}@h1:5672,h1:5672/v", "BROKER_URL: a RabbitMQ node is listed twice"),
        (f"amqp://u:{SECRET}@h1:5672,h2:99999/v", "BROKER_URL: has an invalid port"),
    ],
)
def test_a_malformed_node_list_is_named_without_the_secret(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings({"BROKER_URL": url})
    assert expected in str(error.value)
    assert SECRET not in str(error.value)


def test_queue_type_is_classic_unless_quorum_is_asked_for() -> None:
    assert load_settings({}).rabbitmq_queue_type == "classic"
    assert load_settings({"RABBITMQ_QUEUE_TYPE": "Quorum"}).rabbitmq_queue_type == "quorum"
    with pytest.raises(ConfigError) as error:
        load_settings({"RABBITMQ_QUEUE_TYPE": "stream"})
    assert str(error.value) == (
        "invalid configuration: RABBITMQ_QUEUE_TYPE: must be one of classic, quorum"
    )
    with pytest.raises(ConfigError, match="RABBITMQ_DELIVERY_LIMIT"):
        load_settings({"RABBITMQ_DELIVERY_LIMIT": "0"})


def broker_for(env: dict[str, str]) -> DeadLetteringRabbitmqBroker:
    broker = build_broker(load_settings({"BROKER_URL": NODES, **env}), [])
    assert isinstance(broker, DeadLetteringRabbitmqBroker)
    return broker


def test_quorum_queues_are_declared_with_a_delivery_limit_and_no_classic_arguments() -> None:
    broker = broker_for({"RABBITMQ_QUEUE_TYPE": "quorum", "RABBITMQ_DELIVERY_LIMIT": "4"})
    assert isinstance(broker.parameters, list) and len(broker.parameters) == 3
    assert broker.confirm_delivery
    assert broker._build_queue_arguments("q") == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "q.XQ",
        "x-delivery-limit": 5,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert broker.delivery_limit == 4


def test_classic_queues_keep_dramatiqs_arguments() -> None:
    broker = broker_for({})
    assert broker._build_queue_arguments("q") == {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "q.XQ",
    }
    assert broker.delivery_limit is None


def test_the_delivery_count_comes_from_the_quorum_queue_header() -> None:
    assert delivery_count(pika.BasicProperties()) == 0
    assert delivery_count(pika.BasicProperties(headers={"x-delivery-count": 3})) == 3
    assert delivery_count(pika.BasicProperties(headers={"x-delivery-count": "x"})) == 0
