"""Admin API: auth on every protected route, probes, metrics, data endpoints, 404/422 paths."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter

from provisioner.admin import AdminConfigError, AdminProvider, create_app
from provisioner.queue import NodeState
from tests.provisioner.admin.provider import FleetProvider, populated

TOKEN = "adm1n-t0ken-with-enough-entropy-42"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def provider() -> FleetProvider:
    return populated()


@pytest.fixture
def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("choria_provisioner_test_total", "test counter", registry=reg).inc(3)
    return reg


@pytest.fixture
def client(provider: FleetProvider, registry: CollectorRegistry) -> TestClient:
    return TestClient(create_app(provider, token=TOKEN, registry=registry))


def _protected_routes(client: TestClient) -> list[tuple[str, str]]:
    # Taken from the published OpenAPI so a route added later is covered automatically.
    out = []
    for path, ops in client.get("/openapi.json").json()["paths"].items():
        if path.startswith("/api/v1"):
            concrete = path.replace("{identity}", "node-00000.fleet.example.net")
            out.extend((method.upper(), concrete) for method in sorted(ops))
    return out


def test_in_test_provider_satisfies_the_protocol(provider: FleetProvider) -> None:
    assert isinstance(provider, AdminProvider)


def test_refuses_to_start_without_token(provider: FleetProvider) -> None:
    with pytest.raises(AdminConfigError, match="token"):
        create_app(provider, token=None)
    with pytest.raises(AdminConfigError, match="empty"):
        create_app(provider, token="  ")


def test_allow_unauthenticated_must_be_explicit(provider: FleetProvider) -> None:
    client = TestClient(create_app(provider, token=None, allow_unauthenticated=True))
    assert client.get("/api/v1/status").status_code == 200


def test_every_protected_route_requires_the_token(
    client: TestClient, provider: FleetProvider, caplog: pytest.LogCaptureFixture
) -> None:
    routes = _protected_routes(client)
    assert {p for _, p in routes} >= {
        "/api/v1/status",
        "/api/v1/nodes",
        "/api/v1/pause",
        "/api/v1/resume",
        "/api/v1/discover",
        "/api/v1/audit",
        "/api/v1/overlays",
        "/api/v1/nodes/node-00000.fleet.example.net",
    }
    bad_headers = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer ünïcode".encode()},  # type: ignore[dict-item]
    ]
    caplog.set_level(logging.DEBUG)
    for method, path in routes:
        for headers in bad_headers:
            resp = client.request(method, path, headers=headers)
            assert resp.status_code == 401, (method, path, headers, resp.text)
            assert resp.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in resp.text
    assert provider.calls == []  # nothing mutating ran
    assert TOKEN not in caplog.text


def test_valid_token_opens_every_protected_route(client: TestClient) -> None:
    for method, path in _protected_routes(client):
        if path.startswith("/api/v1/jobs"):
            continue  # a job id or a body needed: tests/provisioner/fleetops/test_api_cli.py
        if path.startswith("/api/v1/revocations") and method != "GET":
            continue  # a body or a revoked identity: tests/provisioner/e2e/test_revocation.py
        assert client.request(method, path, headers=AUTH).status_code == 200, (method, path)


def test_probes(client: TestClient, provider: FleetProvider) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    provider.is_ready = False
    resp = client.get("/readyz")
    assert resp.status_code == 503 and resp.json() == {"ready": False}


@pytest.mark.parametrize("status", ["disconnected", "closed", "election_stopped"])
def test_healthz_is_503_with_the_reason_when_the_replica_cannot_work(
    client: TestClient, provider: FleetProvider, status: str
) -> None:
    provider.health_status = status  # type: ignore[attr-defined]
    resp = client.get("/healthz")
    assert resp.status_code == 503 and resp.json() == {"status": status}
    provider.health_status = "ok"  # type: ignore[attr-defined]
    assert client.get("/healthz").status_code == 200


def test_metrics_serves_the_given_registry(client: TestClient) -> None:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    assert "choria_provisioner_test_total 3.0" in resp.text
    assert "python_gc_objects_collected_total" not in resp.text  # not the default registry


def test_metrics_scrape_is_served_without_the_fastapi_stack(
    provider: FleetProvider, client: TestClient
) -> None:
    """A scrape is answered by a plain Starlette route (no dependency/validation stack), with
    the same bytes as ``generate_latest``; the OpenAPI schema still documents ``/metrics``."""
    from fastapi.routing import APIRoute
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.routing import Match

    from provisioner.metrics import Metrics

    metrics = Metrics(site="lab")
    metrics.observe_stage("helper", 0.25)
    metrics.child(metrics.outcomes, "lab", "provisioned").inc()
    app = create_app(provider, token=TOKEN, registry=metrics.registry)
    scope = {"type": "http", "path": "/metrics", "method": "GET", "root_path": ""}
    first = next(r for r in app.router.routes if r.matches(scope)[0] is Match.FULL)
    assert not isinstance(first, APIRoute)
    resp = TestClient(app).get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == CONTENT_TYPE_LATEST
    assert resp.content == generate_latest(metrics.registry)
    assert "/metrics" in client.get("/openapi.json").json()["paths"]
    assert client.head("/metrics").status_code == 405  # as the FastAPI route: GET only
    assert client.post("/metrics").status_code == 405


def test_metrics_defaults_to_the_global_registry(provider: FleetProvider) -> None:
    resp = TestClient(create_app(provider, token=TOKEN)).get("/metrics")
    assert "python_gc_objects_collected_total" in resp.text


def test_status(client: TestClient) -> None:
    st = client.get("/api/v1/status", headers=AUTH).json()
    assert st["leader"] is True and st["paused"] is False
    assert st["queue"] == {"waiting": 3, "in_flight": 0}
    assert st["counts"]["provisioned"] == 5 and st["counts"]["failed"] == 2
    assert set(st["counts"]) == {str(s) for s in NodeState}  # zero-filled
    assert st["counts"]["csr"] == 0
    assert st["total"] == 10
    assert st["identity"] == "prov1.example.net"  # extra keys pass through
    tp = st["throughput"]
    assert tp["interval"] == 1.0 and len(tp["points"]) == 30
    assert sum(p["count"] for p in tp["points"]) == 5
    assert all(set(p) == {"t", "count"} for p in tp["points"])


def test_nodes_by_state_and_paging(client: TestClient) -> None:
    failed = client.get("/api/v1/nodes", params={"state": "failed"}, headers=AUTH).json()
    assert failed["state"] == "failed" and failed["total"] == 2
    assert {n["last_error"] for n in failed["nodes"]} == {
        "helper exited with code 3",
        "rpc timeout: <jwt>",
    }
    every = client.get("/api/v1/nodes", params={"limit": 3, "offset": 8}, headers=AUTH).json()
    assert every["total"] == 10 and len(every["nodes"]) == 2


@pytest.mark.parametrize(
    "params",
    [{"state": "bogus"}, {"state": ""}, {"limit": 0}, {"limit": "x"}, {"offset": -1}],
)
def test_nodes_invalid_query_is_422(client: TestClient, params: dict[str, object]) -> None:
    assert client.get("/api/v1/nodes", params=params, headers=AUTH).status_code == 422


def test_unknown_query_parameter_is_422_not_ignored(client: TestClient) -> None:
    resp = client.get("/api/v1/nodes", params={"stat": "failed"}, headers=AUTH)
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["query", "stat"]
    assert client.get("/api/v1/status", params={"x": "1"}, headers=AUTH).status_code == 422
    # ...but only after authentication: an anonymous caller learns nothing
    assert client.get("/api/v1/nodes", params={"stat": "failed"}).status_code == 401


def test_node_by_identity(client: TestClient) -> None:
    ok = client.get("/api/v1/nodes/node-00008.fleet.example.net", headers=AUTH)
    assert ok.status_code == 200 and ok.json()["state"] == "failed"
    missing = client.get("/api/v1/nodes/nope.example.net", headers=AUTH)
    assert missing.status_code == 404 and missing.json() == {"detail": "no such node"}


@pytest.mark.parametrize(
    "identity",
    ["a" * 64 + ".example.net", ".".join(["a" * 63] * 4), "-bad.example.net", "a..b"],
)
def test_node_path_refuses_what_is_not_an_identity(
    client: TestClient, provider: FleetProvider, identity: str
) -> None:
    asked: list[str] = []
    real = provider.node
    provider.node = lambda i: asked.append(i) or real(i)  # type: ignore[method-assign]
    resp = client.get(f"/api/v1/nodes/{identity}", headers=AUTH)
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["path", "identity"]
    assert asked == []
    assert client.get("/api/v1/nodes/" + "a" * 63 + ".example.net", headers=AUTH).status_code == 404


def test_pause_resume_discover(client: TestClient, provider: FleetProvider) -> None:
    assert client.post("/api/v1/pause", headers=AUTH).json() == {"paused": True}
    assert provider.paused
    assert client.get("/api/v1/status", headers=AUTH).json()["paused"] is True
    assert client.post("/api/v1/resume", headers=AUTH).json() == {"paused": False}
    assert not provider.paused
    assert client.post("/api/v1/discover", headers=AUTH).json() == {"discovered": 7}
    assert provider.discover_calls == 1
    assert client.get("/api/v1/pause", headers=AUTH).status_code == 405


def test_audit_since_and_limit(client: TestClient) -> None:
    tail = client.get("/api/v1/audit", params={"limit": 3}, headers=AUTH).json()["entries"]
    assert [e["time"] for e in tail] == [1007.0, 1008.0, 1009.0]
    assert tail[0]["timings"] == {"jwt": 0.1}
    since = client.get("/api/v1/audit", params={"since": 1005}, headers=AUTH).json()["entries"]
    assert [e["time"] for e in since] == [1006.0, 1007.0, 1008.0, 1009.0]
    for bad in ({"limit": 0}, {"limit": 10_001}, {"since": -1}, {"since": "yesterday"}):
        assert client.get("/api/v1/audit", params=bad, headers=AUTH).status_code == 422


def test_overlays_fill(client: TestClient) -> None:
    ovs = client.get("/api/v1/overlays", headers=AUTH).json()["overlays"]
    assert [o["name"] for o in ovs] == ["empty", "eu-1", "eu-2"]
    by = {o["name"]: o for o in ovs}
    assert by["eu-1"]["fill"] == 0.75 and by["eu-2"]["fill"] == 1.0 and by["empty"]["fill"] == 0
    assert by["eu-2"]["state"] == "cordoned"


def test_status_page_and_static_files(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in (
        "count-total",
        "queue-waiting",
        "overlays-body",
        "failures-body",
        "token-input",
        "login-button",
        "pause-button",
        "throughput-line",
        "throughput-total",
    ):
        assert f'id="{element}"' in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    js = client.get("/static/admin.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "innerHTML" not in js.text.replace("never innerHTML", "")
    assert client.get("/static/admin.css").status_code == 200
    # the page and its script name no other site (the chart is drawn by the script itself)
    assert "//" not in page.text and "http" not in js.text
    for bad in ("/static/index.html", "/static/..%2fapp.py", "/static/nope.js"):
        assert client.get(bad).status_code == 404


def test_openapi_documents_models_and_bearer_auth(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    for name in ("Status", "NodeInfo", "NodeList", "AuditTail", "OverlayList"):
        assert name in spec["components"]["schemas"]
    states = spec["components"]["schemas"]["NodeState"]["enum"]
    assert "failed" in states and "provisioned" in states
    assert "/" not in spec["paths"]
