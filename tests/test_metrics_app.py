"""GET /metrics and request ids through the app (TestClient), on both stores; the settings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ADMIN, DEVELOPER
from ssa_server.metrics import Metrics, TimedStore
from ssa_server.settings import Settings, SettingsError


def _value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


@pytest.mark.parametrize("store_kind", ["tinydb", "postgresql"])
def test_ssa_active_counts_the_store_and_labels_name_the_backend(make_api, store_kind):
    api = make_api()
    H = api.auth(ADMIN)
    jtis = [api.jti(api.create(H, org_id="acme", one_time_use=False)) for _ in range(3)]
    assert api.client.delete("/ssa", params={"jti": jtis[0]}, headers=H).status_code == 200
    assert api.client.post("/ssa/validation", headers={"jti": jtis[1]}).status_code == 200
    r = api.client.get("/metrics", headers=H)
    assert r.status_code == 200
    assert _value(r.text, "ssa_active") == 2
    backend = "postgresql" if store_kind == "postgresql" else "tinydb"
    assert _value(r.text, "ssa_store_operation_duration_seconds_count", op="add_ssa", backend=backend) == 3
    assert _value(r.text, "ssa_store_operation_duration_seconds_count", op="revoke_ssas",
                  backend=backend) == 1


@pytest.mark.parametrize("given", [b"", b"x" * 65, b"a b", b"caf\xc3\xa9", b"eyJhbGciOi.eyJzdWIi.c2ln" * 4,
                                   b"\x00\x01", b"../../etc"])
def test_an_odd_request_id_is_replaced(api, given):
    r = api.client.get("/health/live", headers=[(b"x-request-id", given)])
    assert r.status_code == 200
    assert r.headers["x-request-id"] != given.decode("latin-1")
    assert len(r.headers["x-request-id"]) <= 64


def test_a_sane_request_id_is_echoed_and_ids_differ(api):
    assert api.client.get("/health/live", headers={"X-Request-ID": "Req.1:2-3_4"}).headers["x-request-id"] \
        == "Req.1:2-3_4"
    made = {api.client.get("/jwks").headers["x-request-id"] for _ in range(5)}
    assert len(made) == 5


def test_metrics_route_refusals_are_json(api):
    assert api.client.get("/metrics").status_code == 401
    assert api.client.get("/metrics", headers=api.auth(DEVELOPER)).json()["error"] == "unauthorized_client"
    r = api.client.post("/metrics", headers=api.auth(ADMIN))
    assert r.status_code == 405 and set(r.json()) == {"error", "error_description"}
    r = api.client.get("/metrics", params={"x": "y" * 5000, "jti": "a"}, headers=api.auth(ADMIN))
    assert r.status_code == 200 and "y" * 50 not in r.text


def test_metrics_port_moves_the_route(make_api):
    api = make_api(metrics_port=9)
    r = api.client.get("/metrics", headers=api.auth(ADMIN))
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_every_store_operation_is_timed_the_audit_appends_too(api):
    H = api.auth(ADMIN)
    api.create(H, org_id="acme")
    assert api.client.get("/audit", headers=H).status_code == 200  # (waits for the event's append)
    text = api.client.get("/metrics", headers=H).text
    for op in ("add_ssa", "append_audit", "list_audit"):
        count = _value(text, "ssa_store_operation_duration_seconds_count", op=op, backend="tinydb")
        assert count is not None and count >= 1, op
    timed = set(vars(TimedStore(api.client.app.state.server.store.inner, Metrics(), "tinydb")))
    assert {"append_audit", "use_assertion", "delete_template", "compact_keys"} <= timed


def test_metrics_off_answer_404_and_time_nothing(make_api):
    api = make_api(metrics_enabled=False)
    H = api.auth(ADMIN)
    jti = api.jti(api.create(H, org_id="acme", one_time_use=False))
    assert api.client.post("/ssa/validation", headers={"jti": jti}).status_code == 200
    r = api.client.get("/metrics", headers=H)
    assert r.status_code == 404 and "metrics_enabled" in r.json()["error_description"]
    assert "x-request-id" in r.headers  # the request ids and headers stay
    server = api.client.app.state.server
    assert not isinstance(server.store, TimedStore)  # no wrapper: nothing timed per store operation
    text = server.metrics.exposition().decode()
    assert _value(text, "http_server_request_duration_seconds_count", method="POST", route="/ssa",
                  status="201") is None
    assert _value(text, "ssa_store_operation_duration_seconds_count", op="add_ssa", backend="tinydb") is None


@pytest.mark.parametrize("changes, message", [
    ({"metrics_port": 9100, "metrics_enabled": False}, "SSA_METRICS_ENABLED is false"),
    ({"metrics_port": 8080}, "SSA_METRICS_PORT=8080"),
    ({"metrics_port": 70000}, "SSA_METRICS_PORT=70000"),
    ({"log_format": "xml"}, "SSA_LOG_FORMAT='xml'"),
])
def test_settings_are_checked(changes, message):
    with pytest.raises(SettingsError, match=message):
        Settings(**changes)


def test_config_show_lists_the_new_settings(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ssa_server", "config", "show", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60,
                       env={**{k: v for k, v in os.environ.items() if not k.startswith("SSA_")},
                            "SSA_LOG_FORMAT": "json", "SSA_METRICS_PORT": "9100"})
    assert r.returncode == 0, r.stderr
    assert '"log_format": "json"' in r.stdout and '"metrics_port": 9100' in r.stdout
