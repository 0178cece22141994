"""The test bed: everything that runs a provisioner *for* someone rather than *being* one.

Supervised local servers (nats-server, the isolated broker, cfssl and OpenBao launchers), the
simulated fleet, the demo and the benchmark harness. Nothing in the server imports this package;
only ``provisioner/cli`` reaches it, to run ``provisioner demo|bench|fleet``. See
``docs/architecture.md``.
"""
