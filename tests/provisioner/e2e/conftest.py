"""Registers the e2e environment's marker for the tests in this directory.

``dev_broker`` opts a test out of the isolated provisioning broker (see ``env.py``); tests
elsewhere that use ``prov_env`` need it registered in ``pyproject.toml`` too.
"""

from __future__ import annotations

import pytest

from tests.provisioner.e2e.env import DEV_BROKER_MARK


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{DEV_BROKER_MARK}: use the plain dev nats-server instead of the isolated broker",
    )
