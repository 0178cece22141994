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

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Exports are resolved lazily (module ``__getattr__``): a helper that runs once per node must not
# pay for httpx and the cfssl/Vault stack when it only signs with the local CA.
_EXPORTS = {
    "CAAdapter": ".base",
    "CAError": ".base",
    "CAVerificationError": ".base",
    "SignRequest": ".base",
    "SignResult": ".base",
    "CFSSLAdapter": ".cfssl",
    "CAConfigError": ".factory",
    "adapter_from_config": ".factory",
    "GuardedCA": ".guard",
    "LocalCA": ".local",
    "VaultAdapter": ".vault",
    "Expectations": ".verify",
    "verify_issued": ".verify",
}

if TYPE_CHECKING:
    from .base import CAAdapter, CAError, CAVerificationError, SignRequest, SignResult
    from .cfssl import CFSSLAdapter
    from .factory import CAConfigError, adapter_from_config
    from .guard import GuardedCA
    from .local import LocalCA
    from .vault import VaultAdapter
    from .verify import Expectations, verify_issued


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
