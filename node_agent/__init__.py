"""A Choria-compatible node agent: a go-choria server in provisioning mode, then normal mode.

``node_agent.node.NodeAgent`` is one node, ``testbed.fleet.Fleet`` runs many, and
``choria_core.ecdh`` holds the key-transport crypto the provisioner also imports. See
``docs/node-agent.md``. Nothing is imported here so that ``node_agent.facts`` stays cheap.
"""
