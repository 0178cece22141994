"""A nats-server laid out like a Choria Broker with provisioning enabled.

What go-choria's broker sets up (``broker/network/network_accounts.go`` and
``network_jetstream.go``), as a plain nats-server configuration:

* account ``choria``: the fleet, with Choria Streams (JetStream). It holds the election bucket
  ``CHORIA_LEADER_ELECTION`` (stream ``KV_CHORIA_LEADER_ELECTION``: subjects
  ``$KV.CHORIA_LEADER_ELECTION.>``, one message per subject, max age = the election TTL,
  1 KiB values, file storage, discard new, deny delete, rollup and direct get allowed) and
  exports exactly two services to ``provisioning`` (singleton responses):
  ``$JS.API.STREAM.INFO.KV_CHORIA_LEADER_ELECTION`` and ``$KV.CHORIA_LEADER_ELECTION.provisioner``.
* account ``provisioning``: no JetStream. The provisioner and the nodes in provisioning mode.
  It imports the bucket's ``STREAM.INFO`` as
  ``choria.streams.STREAM.INFO.KV_CHORIA_LEADER_ELECTION`` and the one election key
  ``$KV.CHORIA_LEADER_ELECTION.provisioner`` (both as itself and under ``choria.streams.``),
  nothing else of Streams: no KV reads, no deletes, no bucket creation, no other bucket or
  key. It exports ``choria.lifecycle.>`` to ``choria``.
* account ``system``.

Users: ``provisioner`` (provisioning account, unrestricted inside it, as go-choria's
provisioner user), ``node`` (provisioning account, the node permissions of
:mod:`testbed.natsserver`), ``choria`` (choria account: an observer that can read the bucket),
``sys``. :func:`start_choria_broker` starts it and creates the election bucket in the
``choria`` account, as the broker does when Choria Streams is enabled.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import nats
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from provisioner.broker.config import nats_conf_quote
from testbed.natsserver import NODE_PUBLISH, NODE_SUBSCRIBE, NatsServer, start_nats_server

__all__ = [
    "API_PREFIX",
    "ELECTION_BUCKET",
    "IMPORTED_SUBJECTS",
    "choria_broker_accounts",
    "create_election_bucket",
    "start_choria_broker",
    "start_choria_broker_layout",
]

#: The JetStream API prefix a Choria Broker's provisioning account reaches Streams through.
API_PREFIX = "choria.streams"
ELECTION_BUCKET = "CHORIA_LEADER_ELECTION"
_STREAM = f"KV_{ELECTION_BUCKET}"
_KEY_SUBJECT = f"$KV.{ELECTION_BUCKET}.provisioner"
_INFO_EXPORT = f"$JS.API.STREAM.INFO.{_STREAM}"

#: Every subject the provisioning account can reach the choria account's Streams through.
IMPORTED_SUBJECTS = (
    f"{API_PREFIX}.STREAM.INFO.{_STREAM}",
    _KEY_SUBJECT,
    f"{API_PREFIX}.{_KEY_SUBJECT}",
)


def _list(values: list[str] | tuple[str, ...]) -> str:
    return "[" + ", ".join(nats_conf_quote(v) for v in values) + "]"


def _user(name: str, password: str, permissions: str = "") -> str:
    return (
        f"{{ user: {nats_conf_quote(name)}, password: {nats_conf_quote(password)}{permissions} }}"
    )


def choria_broker_accounts(users: dict[str, tuple[str, str]]) -> str:
    """The ``accounts`` block of a Choria Broker with provisioning (see the module docstring)."""
    q = nats_conf_quote
    node_perms = (
        f", permissions: {{ publish: {{ allow: {_list(NODE_PUBLISH)} }}, "
        f"subscribe: {{ allow: {_list(NODE_SUBSCRIBE)} }}, "
        'allow_responses: { max: 1, expires: "1m" } }'
    )
    imports = [
        (_INFO_EXPORT, IMPORTED_SUBJECTS[0]),
        (_KEY_SUBJECT, IMPORTED_SUBJECTS[1]),
        (_KEY_SUBJECT, IMPORTED_SUBJECTS[2]),
    ]
    import_lines = "\n".join(
        f"      {{ service: {{ account: choria, subject: {q(subject)} }}, to: {q(local)} }}"
        for subject, local in imports
    )
    return f"""
accounts {{
  choria {{
    jetstream: enabled
    users = [ {_user(*users["choria"])} ]
    exports = [
      {{ service: {q(_INFO_EXPORT)}, accounts: [provisioning], response_type: singleton }}
      {{ service: {q(_KEY_SUBJECT)}, accounts: [provisioning], response_type: singleton }}
    ]
    imports = [ {{ stream: {{ account: provisioning, subject: "choria.lifecycle.>" }} }} ]
  }}
  provisioning {{
    users = [
      {_user(*users["provisioner"])}
      {_user(*users["node"], node_perms)}
    ]
    exports = [ {{ stream: "choria.lifecycle.>", accounts: [choria] }} ]
    imports = [
{import_lines}
    ]
  }}
  system {{ users = [ {_user(*users["sys"])} ] }}
}}
system_account: system
"""


async def create_election_bucket(server: NatsServer, ttl: float) -> None:
    """Create ``CHORIA_LEADER_ELECTION`` in the ``choria`` account as go-choria's broker does."""
    user, password = server.users["choria"]
    nc = await nats.connect(server.url, user=user, password=password, connect_timeout=5)
    try:
        await nc.jetstream(timeout=10).add_stream(
            StreamConfig(
                name=_STREAM,
                description="Choria Leader Election Bucket",
                subjects=[f"$KV.{ELECTION_BUCKET}.>"],
                max_age=ttl,
                max_msg_size=1024,
                max_msgs_per_subject=1,
                storage=StorageType.FILE,
                discard=DiscardPolicy.NEW,
                deny_delete=True,
                allow_rollup_hdrs=True,
                allow_direct=True,
                num_replicas=1,
            )
        )
    finally:
        await nc.close()


def start_choria_broker_layout(workdir: Path, *, die_with_parent: bool = False) -> NatsServer:
    """Start the layout (no election bucket yet: see :func:`start_choria_broker`)."""
    users = {
        role: (role, secrets.token_urlsafe(16)) for role in ("provisioner", "node", "choria", "sys")
    }
    return start_nats_server(
        workdir,
        accounts=choria_broker_accounts(users),
        users=users,
        die_with_parent=die_with_parent,
    )


async def start_choria_broker(
    workdir: Path, *, election_ttl: float | None = 3.0, die_with_parent: bool = False
) -> NatsServer:
    """Start the layout and, with ``election_ttl`` (None: none), create the election bucket."""
    server = await asyncio.to_thread(
        start_choria_broker_layout, workdir, die_with_parent=die_with_parent
    )
    if election_ttl is not None:
        try:
            await create_election_bucket(server, election_ttl)
        except BaseException:
            server.stop()
            raise
    return server
