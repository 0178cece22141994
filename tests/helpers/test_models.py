"""The helper contract models: anchor-exact input JSON, output validation, decisions."""

from __future__ import annotations

import json

import pytest

from helpers.models import (
    CSRInput,
    Ed25519Input,
    HelperInput,
    HelperOutput,
    HelperOutputError,
    decision,
    parse_helper_output,
    provisioning_left_enabled,
)

# The example input of the anchor's documentation (choria-io/provisioner), abbreviated keys.
ANCHOR_EXAMPLE = (
    '{"identity":"24bd22cdb279.choria.local","csr":null,'
    '"ed25519_pubkey":{"public_key":"2ddc594c","directory":"/etc/choria","signature":"34c55a0a"},'
    '"inventory":"{\\"agents\\":[\\"choria_provision\\",\\"choria_util\\",\\"discovery\\",'
    '\\"rpcutil\\"],\\"classes\\":[],\\"collectives\\":[\\"provisioning\\"],\\"data_plugins\\":[],'
    '\\"facts\\":{},\\"machines\\":[],\\"main_collective\\":\\"provisioning\\",'
    '\\"version\\":\\"0.99.0.20221129\\",\\"upgradable\\":true}",'
    '"jwt":{"cht":"s3cret","chs":false,"chu":"nats://broker.choria.local:4222","chpd":true,'
    '"extensions":null,"ou":"choria","v2":true,"purpose":"choria_provisioning",'
    '"iss":"Choria Tokens Package v0.26.2","sub":"choria_provisioning","nbf":1669809657,'
    '"iat":1669809657,"jti":"3a4f9896e013498daeedbcb9a82fcd3c"}}'
)


def test_anchor_example_round_trips_byte_for_byte() -> None:
    inp = HelperInput.model_validate_json(ANCHOR_EXAMPLE)
    assert inp.ed25519_pubkey == Ed25519Input(
        public_key="2ddc594c", directory="/etc/choria", signature="34c55a0a"
    )
    assert inp.inventory_data()["version"] == "0.99.0.20221129"
    assert inp.to_anchor_json() == ANCHOR_EXAMPLE
    assert inp.secrets() == ["s3cret"]


def test_anchor_json_escapes_like_go() -> None:
    inp = HelperInput(
        identity="n1",
        csr=CSRInput(csr="a<b>&c", public_key="", ssldir="/x"),
        inventory=json.dumps({"facts": {"note": "é\u2028"}}, ensure_ascii=False),
    )
    text = inp.to_anchor_json()
    assert "\\u003c" in text and "\\u003e" in text and "\\u0026" in text
    assert "é" in text and "\\u2028" in text and "<" not in text
    assert json.loads(text)["csr"]["csr"] == "a<b>&c"
    assert isinstance(json.loads(text)["inventory"], str)


def test_inventory_data_tolerates_bad_text() -> None:
    assert HelperInput(identity="n", inventory="not json").inventory_data() == {}
    assert HelperInput(identity="n", inventory="[1]").facts() == {}
    inp = HelperInput.synthetic("n", {"customer": "acme"})
    assert inp.facts() == {"customer": "acme"}
    assert json.loads(inp.inventory)["main_collective"] == "provisioning"


def test_output_validation_names_every_problem() -> None:
    with pytest.raises(HelperOutputError) as ei:
        parse_helper_output(
            {
                "configuration": {"x": 5, "y": None},
                "shutdown": 1,
                "certificate": ["pem"],
                "opa_policies": {"a.policy": "x"},
                "server_claims": {"collectives": "c", "permissions": {"streams": "yes"}},
            }
        )
    problems = ei.value.problems
    assert "configuration['x'] must be a string, got int 5" in problems
    assert "configuration['y'] must be a string, got null null" in problems
    assert "shutdown must be a bool, got int 1" in problems
    assert any(p.startswith("certificate must be a string, got array") for p in problems)
    assert "opa_policies file name 'a.policy' must end with '.rego'" in problems
    assert any("server_claims['collectives']" in p for p in problems)
    assert any("server_claims['permissions']['streams'] must be a bool" in p for p in problems)
    with pytest.raises(HelperOutputError, match="must be a JSON object"):
        parse_helper_output([1, 2])


def test_output_nulls_and_unknown_keys() -> None:
    out, warnings = parse_helper_output(
        {"defer": None, "msg": None, "configuration": None, "server_claims": None, "extra": 1}
    )
    assert out == HelperOutput()
    assert warnings == ["unknown output key 'extra' ignored"]


@pytest.mark.parametrize(
    ("conf", "left_enabled"),
    [
        ({}, False),  # without the setting the node's token (chpd) decides, as in go-choria
        ({"plugin.choria.server.provision": "true"}, True),
        ({"plugin.choria.server.provision": "yes"}, True),
        ({"plugin.choria.server.provision": "false"}, False),
        ({"plugin.choria.server.provision": " FALSE "}, False),
        ({"plugin.choria.server.provision": "0"}, False),
    ],
)
def test_provisioning_left_enabled(conf: dict[str, str], left_enabled: bool) -> None:
    assert provisioning_left_enabled(HelperOutput(configuration=conf)) is left_enabled


def test_decision_precedence() -> None:
    ok = {"plugin.choria.server.provision": "false"}
    assert decision(HelperOutput(defer=True, shutdown=True)) == "defer"
    assert decision(HelperOutput(shutdown=True)) == "shutdown"
    assert decision(HelperOutput(upgrade="0.29.4")) == "upgrade"
    assert decision(HelperOutput(configuration={"identity": "n"})) == "configure"
    left_on = {"plugin.choria.server.provision": "true"}
    assert decision(HelperOutput(configuration=left_on)) == "refuse"
    assert decision(HelperOutput(configuration=ok)) == "configure"
