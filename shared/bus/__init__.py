"""NATS JetStream runtime: connection, streams, publishing and the idempotent consumer."""

from shared.bus.connection import Bus, connect_bus
from shared.bus.consumer import IdempotentConsumer, Outcome, Subscription

__all__ = ["Bus", "IdempotentConsumer", "Outcome", "Subscription", "connect_bus"]
