"""Admin HTTP API and status page of the provisioner (health, metrics, status, control)."""

from provisioner.admin.app import AdminConfigError, create_app
from provisioner.admin.provider import AdminProvider
from provisioner.admin.server import AdminServer, serve_admin, stop_admin

__all__ = [
    "AdminConfigError",
    "AdminProvider",
    "AdminServer",
    "create_app",
    "serve_admin",
    "stop_admin",
]
