"""Property test of the admin API from its own OpenAPI schema: no 500s, responses conform."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings

from provisioner.admin import create_app
from tests.provisioner.admin.provider import populated

TOKEN = "schemathesis-admin-token"
app = create_app(populated(), token=TOKEN)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_admin_api_never_500s(case: schemathesis.Case) -> None:
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code < 500, (case.method, case.formatted_path, response.text)
    # Documented status codes, content types and response schemas.
    case.validate_response(response, headers={"Authorization": f"Bearer {TOKEN}"})
