"""The HA test bed lives in :mod:`testbed.ha_cluster` (``bench/failover.py`` uses it too)."""

from __future__ import annotations

from testbed.ha_cluster import ADMIN_TOKEN, TOKEN, HACluster, Replica, certificate_report

__all__ = ["ADMIN_TOKEN", "TOKEN", "HACluster", "Replica", "certificate_report"]
