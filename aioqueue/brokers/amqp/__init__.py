"""``amqp://`` (also ``amqps://``, ``pyamqp://``): RabbitMQ through aio-pika, with the AMQP
wire code aioqueue writes itself (frames, field tables, the frame stream) in one place.

``broker``: the Broker; ``consumer``, ``publisher``: its per-message paths; ``channel``: URL,
error translation, channel plumbing; ``stream``: our own transport under aiormq; ``frames``,
``field_tables``, ``decoding``: bytes in and out; ``constants``: the spec's numbers.
"""

from .broker import AmqpBroker
from .consumer import AmqpConsumer, AmqpDelivery

__all__ = ("AmqpBroker", "AmqpConsumer", "AmqpDelivery")
