"""Property test of the admin API from its own OpenAPI schema: no 500s, responses conform.

Schemathesis generates valid and invalid requests for every operation (with the admin token
configured through the schema's own HTTPBearer security scheme) and runs its default checks:
no server errors, documented status codes and content types, response schemas, invalid input
rejected.
"""

from __future__ import annotations

import os

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from provisioner.admin import create_app
from tests.provisioner.admin.provider import populated

TOKEN = "schemathesis-admin-token"
app = create_app(populated(), token=TOKEN)
schema = schemathesis.openapi.from_asgi(
    "/openapi.json",
    app,
    config=SchemathesisConfig.from_dict({"auth": {"openapi": {"HTTPBearer": {"bearer": TOKEN}}}}),
)
EXAMPLES = int(os.environ.get("ADMIN_SCHEMATHESIS_EXAMPLES", "30"))


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_admin_api_never_500s(case: schemathesis.Case) -> None:
    response = case.call_and_validate()
    assert response.status_code < 500, (case.method, case.formatted_path, response.text)
    if case.meta is not None and case.meta.generation.mode == GenerationMode.POSITIVE:
        # Valid requests carry the configured token: they must get past authentication.
        assert response.status_code != 401, (case.method, case.formatted_path)
