"""Admin HTTP API and status page of the provisioner (health, metrics, status, control).

* :mod:`provisioner.admin.readmodel`: what the API reads from the running service;
* :mod:`provisioner.admin.provider`: the contract between the API and the service;
* :mod:`provisioner.admin.app` (FastAPI) and :mod:`provisioner.admin.server` (uvicorn).

The web framework is imported on first use of :func:`create_app` or the server functions: the
service imports the read model at start-up and serves the API only when ``admin.token`` is set.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from provisioner.admin.provider import AdminProvider

if TYPE_CHECKING:
    from provisioner.admin.app import AdminConfigError, create_app
    from provisioner.admin.server import AdminServer, serve_admin, stop_admin

__all__ = [
    "AdminConfigError",
    "AdminProvider",
    "AdminServer",
    "create_app",
    "serve_admin",
    "stop_admin",
]

#: Names served from a submodule that imports the (heavy) web framework.
_LAZY = {
    "AdminConfigError": "provisioner.admin.app",
    "create_app": "provisioner.admin.app",
    "AdminServer": "provisioner.admin.server",
    "serve_admin": "provisioner.admin.server",
    "stop_admin": "provisioner.admin.server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
