"""Broker isolation for unprovisioned nodes: nats-server config and the auth callout.

- :mod:`provisioner.broker.config`: ``provisioner broker config`` (nats-server config, callout
  config, secrets, TLS).
- :mod:`provisioner.broker.callout`: ``provisioner broker auth``, the auth callout service.
- :mod:`provisioner.broker.isolated`: :func:`start_isolated_broker` for tests, demo, benchmark.
"""

from provisioner.broker.callout import (
    CalloutConfig,
    CalloutService,
    CalloutStats,
    Refused,
    load_callout_config,
    node_permissions,
)
from provisioner.broker.config import BrokerFiles, generate_broker_config
from provisioner.broker.isolated import IsolatedBroker, start_isolated_broker

__all__ = [
    "BrokerFiles",
    "CalloutConfig",
    "CalloutService",
    "CalloutStats",
    "IsolatedBroker",
    "Refused",
    "generate_broker_config",
    "load_callout_config",
    "node_permissions",
    "start_isolated_broker",
]
