"""Choria protocol v1 wire layer: messages, subjects, MCORPC bodies, lifecycle events.

Pure code, no I/O; ``docs/protocol.md`` describes the wire format. Every decoder raises
:class:`ProtocolError` (a ``ValueError``) and nothing else on malformed input.
"""

from choria_core.protocol.errors import ProtocolError
from choria_core.protocol.lifecycle import (
    LifecycleEvent,
    encode_event,
    new_event,
    parse_event,
)
from choria_core.protocol.mcorpc import (
    RPCReply,
    RPCRequest,
    StatusCode,
    encode_rpc_request,
    parse_rpc_request,
)
from choria_core.protocol.messages import (
    Filter,
    Reply,
    Request,
    TransportHeaders,
    check_request,
    decode_payload,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    new_reply,
    new_request,
)
from choria_core.protocol.signing import (
    RequestSigner,
    RequestTrust,
    SecureEnvelope,
    verify_secure_request,
)
from choria_core.protocol.subjects import (
    IdentityProblem,
    broadcast_subject,
    directed_subject,
    identity_problem,
    is_valid_identity,
    lifecycle_subject,
    new_request_id,
    reply_prefix,
    reply_subject,
)

__all__ = [
    "Filter",
    "IdentityProblem",
    "LifecycleEvent",
    "ProtocolError",
    "RPCReply",
    "RPCRequest",
    "Reply",
    "Request",
    "RequestSigner",
    "RequestTrust",
    "SecureEnvelope",
    "StatusCode",
    "TransportHeaders",
    "broadcast_subject",
    "check_request",
    "decode_payload",
    "decode_reply",
    "decode_request",
    "directed_subject",
    "encode_event",
    "encode_reply",
    "encode_request",
    "encode_rpc_request",
    "identity_problem",
    "is_valid_identity",
    "lifecycle_subject",
    "new_event",
    "new_reply",
    "new_request",
    "new_request_id",
    "parse_event",
    "parse_rpc_request",
    "reply_prefix",
    "reply_subject",
    "verify_secure_request",
]
