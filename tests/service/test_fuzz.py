"""Schemathesis against the live OpenAPI schema of a real server: generated requests for every operation
(bounded examples) must never get a 5xx, every error must be a JSON ``{"error": "..."}`` body, and
responses must match the documented status codes, content types and schemas."""

from __future__ import annotations

import shutil

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.checks import not_a_server_error

from .conftest import start_server, write_site_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def fuzz_server(tmp_path_factory, registry_root):
    """Own copy of the registry (fuzzed enrol/delete must not touch other tests) and a workflow that
    collects from an empty local folder, so generated workflow requests fail fast without any network."""
    base = tmp_path_factory.mktemp("fuzz")
    registry = base / "registry"
    shutil.copytree(registry_root, registry)
    (base / "empty").mkdir()
    conf = write_site_config(base / "site_conf", base / "empty", base / "wf", [])
    srv = start_server(base / "srv", registry, ["limits.max_files=4", "limits.request_timeout_s=60"],
                       config_dir=conf, config_name="serve_site")
    yield srv
    srv.stop()


def _operation_labels() -> list[str]:
    """Operation labels from the app's schema at collection time (no server or model needed)."""
    from anime_role_detect.serve import create_app

    spec = create_app({"feature_log": {"enabled": False}}).openapi()
    return [f"{m.upper()} {p}" for p, item in spec["paths"].items() for m in item]


@pytest.fixture(scope="session")
def live_schema(fuzz_server):
    """The schema as the running server publishes it."""
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


def _check(case) -> None:
    response = case.call(timeout=60)
    if response.status_code >= 400:
        content_type = (response.headers.get("content-type") or [""])[0]
        assert content_type.startswith("application/json"), response.text[:300]
        body = response.json()
        assert isinstance(body.get("error"), str) and body["error"].strip(), body
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                             response_schema_conformance])


@pytest.mark.parametrize("label", _operation_labels())
def test_no_5xx_and_every_error_is_json(live_schema, label):
    op = next(r.ok() for r in live_schema.get_all_operations() if r.ok().label == label)

    @given(case=op.as_strategy())
    @settings(max_examples=10, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def fuzz(case) -> None:
        _check(case)

    fuzz()
