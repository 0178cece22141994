"""``provisioner demo``: the whole system doing its real job on one machine, nothing to configure.

:class:`Demo` starts, on 127.0.0.1 and inside one work directory:

1. a token signing key pair and a provisioning token whose ``chu`` is the provisioning broker;
2. the provisioning broker: nats-server with the auth callout
   (:func:`testbed.isolated_broker.start_isolated_broker`), TLS as go-choria nodes expect;
3. a CA: the built-in :class:`ca_adapters.LocalCA` (EC), or ``cfssl serve`` with ``ca="cfssl"``;
4. one small nats-server per overlay of the packaged sample registry, each requiring TLS
   client certificates issued by that CA (so a node that connects has *proved* its
   certificate chains), and the registry rewritten to point at them;
5. the reference helper (python mode by default) configured for those overlays and the CA;
6. the provisioner with its admin API and status page on a free port;
7. ``N`` simulated nodes (:class:`testbed.fleet.Fleet`, EC keys).

It then waits until every node is provisioned and back in normal mode, and **verifies** the
result independently of the provisioner's own bookkeeping: every node's certificate (read from
the node's ssldir on disk) chains to the CA, has CN and SAN = identity and matches the node's
``private.pem``; every node is connected, by name, to the nats-server of the overlay it was
placed in (the servers' ``/connz`` monitoring endpoint). :meth:`Demo.close` stops everything it
started, in reverse order, also after Ctrl-C.

Modules: :mod:`~testbed.demo.options` (what the demo is asked for, what it reports),
:mod:`~testbed.demo.harness` (the run, on a :class:`testbed.stack.Stack`) and
:mod:`~testbed.demo.verify` (the independent checks).
"""

from __future__ import annotations

from testbed.demo.harness import Demo
from testbed.demo.options import (
    DEFAULT_NODES,
    DemoError,
    DemoOptions,
    DemoResult,
    DemoUsageError,
    NodeCheck,
)
from testbed.demo.verify import percentile, verify_node_certificate

__all__ = [
    "DEFAULT_NODES",
    "Demo",
    "DemoError",
    "DemoOptions",
    "DemoResult",
    "DemoUsageError",
    "NodeCheck",
    "percentile",
    "verify_node_certificate",
]
