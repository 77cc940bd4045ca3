"""Brokers: where task messages wait. Each implements ``aioqueue.brokers.base.Broker``."""
