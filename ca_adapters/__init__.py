"""CA adapters: one small async protocol (:class:`CAAdapter`), one module per CA.

- :class:`LocalCA` (``local.py``): in-process CA for development, tests and small sites.
- :class:`CFSSLAdapter` (``cfssl.py``): cfssl serve and multirootca.
- :class:`VaultAdapter` (``vault.py``): Vault / OpenBao PKI.
- :class:`GuardedCA` (``guard.py``): rate limit, concurrency cap and circuit breaker.
- :func:`adapter_from_config` (``factory.py``): build one from the ``ca:`` configuration.

Every remote answer is re-verified (``verify.py``) before it is returned.
Real cfssl/multirootca/OpenBao servers for tests, demo and benchmark are started by
``testbed.ca_servers``.
"""

from .base import CAAdapter, CAError, CAVerificationError, SignRequest, SignResult
from .cfssl import CFSSLAdapter
from .factory import CAConfigError, adapter_from_config
from .guard import GuardedCA
from .local import LocalCA
from .vault import VaultAdapter
from .verify import Expectations, verify_issued

__all__ = [
    "CAAdapter",
    "CAConfigError",
    "CAError",
    "CAVerificationError",
    "CFSSLAdapter",
    "Expectations",
    "GuardedCA",
    "LocalCA",
    "SignRequest",
    "SignResult",
    "VaultAdapter",
    "adapter_from_config",
    "verify_issued",
]
