"""docs/openapi.yaml matches what the service does (schemathesis 4.x against the WSGI app)."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, settings

pytest.importorskip("schemathesis")
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from chatkit_flask.service import create_app
from chatkit_flask.testing.fake_chatkit import FakeChatKit
from tests.conftest import TEST_API_KEY, base_config

SPEC = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

# The fake upstream and the app live for the whole module: schemathesis parametrizes at import.
_upstream = FakeChatKit(api_key=TEST_API_KEY).start()
_app = create_app(
    base_config(
        _upstream,
        CHATKIT_RATELIMIT_PER_USER="5 per minute",  # some 429s with their headers, most 200s
        CHATKIT_RATELIMIT_PER_IP="100000 per minute",
        TESTING=False,
    ),
    environ={},
)
schema = schemathesis.openapi.from_path(SPEC)
schema.app = _app


@pytest.fixture(scope="module", autouse=True)
def _stop_upstream():
    yield
    _upstream.stop()


@schema.parametrize()
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_conforms_to_the_spec(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)


def test_spec_documents_every_status_the_endpoint_answers() -> None:
    spec = yaml.safe_load(SPEC.read_text())
    assert spec["openapi"].startswith("3.1")
    responses = spec["paths"]["/api/chatkit/secret"]["post"]["responses"]
    assert set(responses) == {"200", "400", "403", "413", "415", "429", "502", "503", "504"}
    codes = set(spec["components"]["schemas"]["Error"]["properties"]["error"]["enum"])
    source = "".join(
        (Path(__file__).resolve().parent.parent / "chatkit_flask" / name).read_text()
        for name in ("hosted.py", "web.py", "errors.py")
    )
    for code in codes:
        assert f'"{code}"' in source, code
    for header in ("Retry-After", "X-Request-ID", "X-RateLimit-", "Set-Cookie"):
        assert header in SPEC.read_text()


def test_readyz_503_shape_when_storage_is_down(upstream: FakeChatKit) -> None:
    spec = yaml.safe_load(SPEC.read_text())
    expected = spec["paths"]["/readyz"]["get"]["responses"]["503"]["content"]["application/json"]
    app = create_app(
        base_config(upstream, RATELIMIT_STORAGE_URI="redis://127.0.0.1:1/0"), environ={}
    )
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    jsonschema.validate(body, expected["schema"])
    assert body == {"status": "not_ready", "storage": "unreachable", "failing": ["storage"]}
