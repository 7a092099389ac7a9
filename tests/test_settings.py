"""Settings: precedence CLI > SSA_* env > TOML file > defaults, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssa_server.settings import Settings, SettingsError, load_settings


def test_defaults():
    s = load_settings({}, {})
    assert (s.issuer, s.ssa_endpoint, s.signing_alg, s.expiration_in_days, s.enabled) == \
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/ssa", "RS256", 30, True)
    assert s.data_dir == Path("data") and s.scripts_dir == Path("scripts")


def test_precedence(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('port = 9000\nsigning_alg = "ES256"\n[ssa]\nexpiration_in_days = 7\n'
                   'custom_attributes = ["a", "b"]\n')
    s = load_settings({}, {}, cfg)
    assert (s.port, s.signing_alg, s.expiration_in_days, s.custom_attributes) == (9000, "ES256", 7,
                                                                                   ("a", "b"))
    s = load_settings({}, {"SSA_PORT": "9100", "SSA_CUSTOM_ATTRIBUTES": "x, y", "SSA_ENABLED": "off"}, cfg)
    assert (s.port, s.custom_attributes, s.enabled) == (9100, ("x", "y"), False)
    s = load_settings({"port": 9200}, {"SSA_PORT": "9100", "SSA_CONFIG": str(cfg)})
    assert (s.port, s.signing_alg, s.issuer) == (9200, "ES256", "http://127.0.0.1:9200")


@pytest.mark.parametrize("env", [
    {"SSA_SIGNING_ALG": "HS256"}, {"SSA_PORT": "x"}, {"SSA_PORT": "70000"}, {"SSA_ENABLED": "maybe"},
    {"SSA_EXPIRATION_IN_DAYS": "0"}, {"SSA_ISSUER": "ftp://x"}, {"SSA_ON_SCRIPT_ERROR": "ignore"},
    {"SSA_CUSTOM_ATTRIBUTES": "jti"}, {"SSA_SCRIPT_TIMEOUT": "0"}, {"SSA_CONFIG": "/nonexistent.toml"},
    {"SSA_WORKERS": "0"}, {"SSA_WORKERS": "2"}, {"SSA_STORE_POOL_MIN": "0"},
    {"SSA_STORE_POOL_MIN": "5", "SSA_STORE_POOL_MAX": "4", "SSA_STORE_URL": "postgresql://db/ssa"},
    {"SSA_STORE_POOL_TIMEOUT": "0"}, {"SSA_STORE_STATEMENT_TIMEOUT": "-1"},
])
def test_bad_values_are_one_line_errors(env):
    with pytest.raises(SettingsError) as e:
        load_settings({}, env)
    assert "\n" not in str(e.value) and str(e.value)


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("port = [")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings({}, {}, bad)
    bad.write_text("nope = 1")
    with pytest.raises(SettingsError, match="unknown setting"):
        load_settings({}, {}, bad)


def test_public_dict_masks_secrets():
    shown = Settings(store_url="postgresql://app:hunter2@db/ssa").public_dict()
    assert "hunter2" not in str(shown) and shown["store_url"] == "postgresql://app:***@db/ssa"


def test_postgres_settings():
    s = load_settings({"workers": "3"}, {"SSA_STORE_URL": "postgres://db/ssa", "SSA_STORE_POOL_MAX": "4",
                                         "SSA_STORE_STATEMENT_TIMEOUT": "1.5"})
    assert (s.workers, s.uses_postgres, s.store_pool_min, s.store_pool_max, s.store_statement_timeout) == \
        (3, True, 1, 4, 1.5)
    assert not load_settings({}, {"SSA_STORE_URL": "tinydb:///x"}).uses_postgres
    with pytest.raises(SettingsError, match="--workers 2 needs a shared store"):
        load_settings({}, {"SSA_WORKERS": "2"})
