"""One frozen, typed settings object, read once.

Precedence: CLI flags > ``SSA_*`` environment variables > TOML config file > defaults.
Every field maps to ``SSA_<FIELD NAME IN UPPER CASE>`` and to the key ``<field name>`` in the
config file (top level or under an ``[ssa]`` table).  Janssen's ``ssaConfiguration`` maps as:
``ssaEndpoint`` -> ``ssa_endpoint``, ``ssaCustomAttributes`` -> ``custom_attributes``,
``ssaSigningAlg`` -> ``signing_alg``, ``ssaExpirationInDays`` -> ``expiration_in_days``,
``ssaMapSoftwareRolesToScopes`` -> ``map_software_roles_to_scopes``; the ``ssa`` feature flag ->
``enabled``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import secret_refs
from .ssa import RESERVED_ATTRIBUTES  # request fields and server claims: never custom attributes

SIGNING_ALGS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519",
)
JWT_TYPS = ("jwt", "JWT")  # Janssen's, and the OBIE profile's
# An OAuth scope token (RFC 6749 §3.3): printable ASCII but space, '"' and '\\'.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
ON_SCRIPT_ERROR = ("fail", "skip")
LOG_FORMATS = ("text", "json")
SIGNING_BACKENDS = ("software", "pkcs11")
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
SECRET_FIELDS = frozenset({"store_url"})  # may carry a password; masked by ``config show``


class SettingsError(ValueError):
    """A setting has a value the server cannot run with; the message is one clear line."""


@dataclass(frozen=True)
class Settings:
    """The server's effective configuration.  See ``docs/configuration.md`` for each field."""

    host: str = "127.0.0.1"
    port: int = 8080
    issuer: str = ""  # default: http://HOST:PORT
    ssa_endpoint: str = ""  # default: ISSUER/ssa (Janssen ssaEndpoint)
    enabled: bool = True  # the "ssa" feature flag
    signing_alg: str = "RS256"
    jwt_typ: str = "jwt"  # the SSA header's typ
    expiration_in_days: int = 30
    custom_attributes: tuple[str, ...] = ()
    # role -> scopes; the union for an SSA's software_roles becomes its scope claim (Janssen
    # ssaMapSoftwareRolesToScopes).  Not hashed: Settings is never a dict key.
    map_software_roles_to_scopes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    data_dir: Path = Path("./data")
    scripts_dir: Path = Path("./scripts")
    token_ttl: int = 3600  # seconds an access token from POST /token lives
    cleanup_interval: int = 300  # seconds between runs of the expired-SSA cleaner
    cleanup_grace: int = 7 * 24 * 3600  # seconds an expired/revoked/used SSA is kept before purge
    key_refresh_interval: float = 2.0  # seconds between checks for keys rotated by another process
    key_activation_delay: int = 600  # seconds a rotated key is published before it signs (docs/keys.md)
    key_rotation_days: int = 0  # days each SSA key signs before the server rotates it; 0: never
    # The master key private keys are stored encrypted under (docs/keys.md): a reference only,
    # env:VARIABLE or file:/path, never the key; empty: private keys are stored in the clear.
    key_encryption_key: str = ""
    key_encryption_key_previous: str = ""  # the master key before a rotation (keys rewrap), read too
    # Where SSA keys are made and sign (docs/keys.md, "Signing backends"): "software" (keys in the
    # store) or "pkcs11" (keys generated in a PKCS#11 token, never out of it; pip install '.[pkcs11]').
    signing_backend: str = "software"
    pkcs11_module: str = ""  # the token's PKCS#11 module (.so), e.g. /usr/lib/softhsm/libsofthsm2.so
    pkcs11_token_label: str = ""  # the token's label (CKA_LABEL of the token, softhsm2-util --label)
    pkcs11_pin: str = ""  # the user PIN: a reference only, env:VARIABLE or file:/path, never the PIN
    log_level: str = "info"
    # off by default: a line per request costs a share of throughput (bench/README.md)
    access_log: bool = False
    log_format: str = "text"  # "text" or "json" (one object per line)
    # false: no GET /metrics, no per-request or per-store-operation timing (bench --server-env
    # SSA_METRICS_ENABLED=false measures what the metrics cost)
    metrics_enabled: bool = True
    metrics_port: int = 0  # GET /metrics on its own port (open there); 0: on the main port (admin token)
    # OpenTelemetry traces (the [otel] extra; tracing.py): the exporter and resource from OTEL_* variables.
    otel_enabled: bool = False
    # The audit trail (issue 15, core/audit.py): every action hash-chained in the store.
    audit_enabled: bool = True
    # true: a request waits until its event is durable; false: the event rides the next group
    # commit (a crash within those milliseconds may lose it; README "Audit")
    audit_sync: bool = False
    audit_checkpoint_events: int = 1000  # a signed checkpoint at least every N events...
    audit_checkpoint_interval: float = 3600.0  # ...or every T seconds (with new events since the last)
    audit_retention_days: int = 0  # events older than this are purged (a checkpoint at the cut); 0: keep all
    # Sandboxed scripts (issue 3).
    scripts_enabled: bool = True
    on_script_error: str = "fail"  # "fail": a failing create/get script refuses the request; "skip"
    script_timeout: float = 1.0  # wall-clock seconds per call
    script_cpu: float = 0.5  # CPU seconds per call
    script_memory_mb: int = 256  # address-space limit of a worker
    script_output_kb: int = 64  # max JSON result and print output per call
    script_workers: int = 2
    script_reload_interval: float = 1.0  # seconds between polls of the scripts folder
    script_log_lines: int = 100  # log lines each script may write per script_log_interval (the rest: counted)
    script_log_interval: float = 10.0  # seconds: the script log rate's period, and of its summary lines
    script_log_buffer: int = 200  # entries (log lines, failures) kept per script: GET /scripts/{name}/logs
    script_revisions_kept: int = 20  # revisions kept per script in the store (scripts history, rollback)
    # context.http (issue 13): calls the server performs for a script, to its [http] allow-list only.
    script_http_timeout: float = 2.0  # seconds per call (and never past the step's script_timeout)
    script_http_max_kb: int = 256  # response head and body; larger is cut off, the call fails
    script_http_calls_per_step: int = 4  # calls per script call
    script_http_calls_per_second: float = 20.0  # per script, across workers (a token bucket)
    store_url: str = ""  # empty: the embedded TinyDB store in DATA_DIR; postgresql://...: PostgreSQL
    # PostgreSQL store and scale-out (issue 5).
    store_pool_min: int = 1  # connections each process keeps open
    store_pool_max: int = 10  # most connections each process opens
    store_pool_timeout: float = 2.0  # seconds a request waits for a connection before a 503
    store_statement_timeout: float = 5.0  # seconds a statement may run before it is cancelled (503)
    workers: int = 1  # uvicorn worker processes of `serve` (more than 1 needs PostgreSQL)
    # The HTTP edge (issue 11): time limits, the connection cap, failed-authentication throttling.
    http_head_timeout: float = 10.0  # seconds from accept (or a request's first byte) to the end of its head
    http_body_timeout: float = 30.0  # seconds from the end of a head to the end of its body
    http_idle_timeout: float = 5.0  # seconds a kept-alive connection may wait for its next request
    http_max_connections: int = 0  # open connections per process; 0: derived from RLIMIT_NOFILE
    token_failures_per_client: int = 10  # failed client authentications per client_id per window
    token_failures_per_address: int = 50  # ... per client address per window
    token_failure_window: float = 60.0  # seconds
    trusted_proxies: tuple[str, ...] = ()  # addresses or networks whose X-Forwarded-For is believed
    # private_key_jwt client assertions at /token (issue 16; client_assertions.py).
    client_assertion_max_lifetime: int = 300  # seconds an assertion's exp may be ahead of now
    client_assertion_leeway: int = 30  # seconds of clock skew allowed on exp, iat and nbf
    client_jwks_timeout: float = 5.0  # seconds per read of a client's jwks_uri (the whole fetch: twice that)
    client_jwks_refetch_interval: float = 30.0  # seconds between fetches of a jwks_uri for unknown kids
    client_jwks_max_age: float = 300.0  # seconds a fetched client key set is used before it is fetched again
    # GET /ssa/status for unknown jtis per address per token_failure_window
    status_failures_per_address: int = 50
    # Token Status Lists (issue 14; status_list.py, status_issuer.py).
    status_list: bool = True  # every new SSA gets a status claim; GET /statuslists/ID serves the lists
    status_list_size: int = 65536  # indexes per list (a full list is kept, a new one added)
    status_list_ttl: int = 300  # seconds a consumer may cache a Status List Token (its ttl, max-age)
    status_list_refresh: float = 5.0  # seconds a built token is served before the next request rebuilds it
    # Signed event webhooks (issue 15; webhooks.py, webhook_delivery.py; README "Webhooks").
    webhook_timeout: float = 5.0  # seconds for a delivery's connect and for each read (a claim: 2x + 5)
    webhook_max_attempts: int = 10  # failed attempts before a delivery is dead (webhooks replay)
    webhook_retry_base: float = 5.0  # seconds before the 2nd attempt; doubled each time, with jitter
    webhook_retry_max: float = 3600.0  # seconds: the longest wait between two attempts
    webhook_poll_interval: float = 1.0  # seconds between the delivery task's looks at the outbox
    webhook_concurrency: int = 4  # deliveries under way at once per process
    webhook_response_max_kb: int = 64  # of a receiver's answer read (the rest is not read)
    webhook_retention: int = 7 * 24 * 3600  # seconds delivered and dead deliveries are kept
    webhook_allow_http: bool = False  # http:// subscribers beyond loopback (else https only)
    # Access tokens from an external authorization server (issue 16; external_tokens.py).
    external_issuer: str = ""  # its issuer URL: RFC 9068 JWT access tokens with this exact iss are accepted
    external_jwks_uri: str = ""  # empty: the jwks_uri of its RFC 8414 (else OIDC) discovery document
    external_audience: str = ""  # needed with external_issuer: an accepted token's aud holds it
    external_scope_claim: str = "scope"  # the claim holding the scopes: a space-separated string or an array
    external_client_claim: str = "client_id"  # the claim naming the client (the SSA's creator)
    external_leeway: int = 30  # seconds of clock skew allowed on exp, iat and nbf
    external_timeout: float = 5.0  # seconds per read from the issuer (discovery, JWKS, introspection)
    external_jwks_refetch_interval: float = 30.0  # the JWKS fetched again for an unknown kid at most so often
    external_jwks_max_age: float = 300.0  # seconds a fetched JWKS is used before it is fetched again
    introspection_endpoint: str = ""  # RFC 7662: opaque tokens are asked about here
    introspection_client_id: str = ""  # our client_id at the introspection endpoint (client_secret_basic)
    introspection_client_secret: str = ""  # a reference only (env:VARIABLE or file:/path), never the secret
    introspection_cache_seconds: int = 30  # an active answer is kept this long (never past the token's exp)
    token_endpoint_enabled: bool = True  # false: POST /token answers 404, our own tokens are refused

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("data_dir", Path(self.data_dir))
        put("scripts_dir", Path(self.scripts_dir))
        if not self.issuer:
            put("issuer", f"http://{self.host}:{self.port}")
        put("issuer", self.issuer.rstrip("/"))
        if not self.ssa_endpoint:
            put("ssa_endpoint", f"{self.issuer}/ssa")
        self._validate()

    def _validate(self) -> None:
        if self.signing_alg not in SIGNING_ALGS:
            raise SettingsError(
                f"SSA_SIGNING_ALG={self.signing_alg!r} is not supported; use one of {', '.join(SIGNING_ALGS)}"
            )
        if not 0 < self.port < 65536:
            raise SettingsError(f"SSA_PORT={self.port} is not a TCP port (1-65535)")
        if not 0 <= self.metrics_port < 65536 or self.metrics_port == self.port:
            raise SettingsError(f"SSA_METRICS_PORT={self.metrics_port} must be a TCP port other than "
                                "SSA_PORT (1-65535), or 0 (GET /metrics on the main port)")
        if self.metrics_port and not self.metrics_enabled:
            raise SettingsError(f"SSA_METRICS_PORT={self.metrics_port} is set but SSA_METRICS_ENABLED "
                                "is false")
        if self.log_format not in LOG_FORMATS:
            raise SettingsError(f"SSA_LOG_FORMAT={self.log_format!r} must be 'text' or 'json'")
        for name in ("expiration_in_days", "token_ttl", "cleanup_interval", "script_workers",
                     "script_memory_mb", "script_output_kb", "script_http_max_kb",
                     "script_http_calls_per_step", "store_pool_min", "store_pool_max", "workers",
                     "token_failures_per_client", "token_failures_per_address",
                     "status_failures_per_address", "client_assertion_max_lifetime",
                     "audit_checkpoint_events", "webhook_max_attempts", "webhook_concurrency",
                     "webhook_response_max_kb", "webhook_retention"):
            if getattr(self, name) < 1:
                raise SettingsError(f"SSA_{name.upper()}={getattr(self, name)} must be at least 1")
        for name in ("script_timeout", "script_cpu", "key_refresh_interval", "script_reload_interval",
                     "script_log_interval", "store_pool_timeout", "store_statement_timeout",
                     "http_head_timeout", "http_body_timeout", "http_idle_timeout", "token_failure_window",
                     "script_http_timeout", "script_http_calls_per_second", "client_jwks_timeout",
                     "client_jwks_refetch_interval", "client_jwks_max_age", "audit_checkpoint_interval",
                     "webhook_timeout", "webhook_retry_base", "webhook_retry_max", "webhook_poll_interval"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"SSA_{name.upper()}={getattr(self, name)} must be greater than 0")
        if not 8 <= self.status_list_size <= 1 << 24 or self.status_list_size % 8:
            raise SettingsError(f"SSA_STATUS_LIST_SIZE={self.status_list_size} must be a multiple of 8 "
                                f"from 8 to {1 << 24}")
        if self.status_list_ttl < 1:
            raise SettingsError(f"SSA_STATUS_LIST_TTL={self.status_list_ttl} must be at least 1")
        if self.status_list_refresh <= 0:
            raise SettingsError(f"SSA_STATUS_LIST_REFRESH={self.status_list_refresh} must be greater than 0")
        if self.http_max_connections < 0:
            raise SettingsError(f"SSA_HTTP_MAX_CONNECTIONS={self.http_max_connections} must not be negative "
                                "(0: derived from the file-descriptor limit)")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise SettingsError(f"SSA_TRUSTED_PROXIES: {proxy!r} is not an IP address or network") \
                    from None
        if self.script_log_buffer < 0:
            raise SettingsError(f"SSA_SCRIPT_LOG_BUFFER={self.script_log_buffer} must not be negative")
        if not 1 <= self.script_revisions_kept <= 1000:
            raise SettingsError(f"SSA_SCRIPT_REVISIONS_KEPT={self.script_revisions_kept} "
                                "must be from 1 to 1000")
        if self.script_log_lines < 0:
            raise SettingsError(f"SSA_SCRIPT_LOG_LINES={self.script_log_lines} must not be negative")
        for name in ("cleanup_grace", "key_activation_delay", "key_rotation_days", "client_assertion_leeway",
                     "audit_retention_days"):
            if getattr(self, name) < 0:
                raise SettingsError(f"SSA_{name.upper()}={getattr(self, name)} must not be negative")
        self._validate_key_encryption()
        self._validate_signing_backend()
        self._validate_external()
        if self.jwt_typ not in JWT_TYPS:
            raise SettingsError(f"SSA_JWT_TYP={self.jwt_typ!r} must be 'jwt' (Janssen) or 'JWT' (OBIE)")
        self._validate_role_scopes()
        if self.store_pool_max < self.store_pool_min:
            raise SettingsError(f"SSA_STORE_POOL_MAX={self.store_pool_max} is below "
                                f"SSA_STORE_POOL_MIN={self.store_pool_min}")
        if self.workers > 1 and not self.uses_postgres:
            raise SettingsError(f"--workers {self.workers} needs a shared store "
                                "(SSA_STORE_URL=postgresql://...); the embedded TinyDB store serves one "
                                "process")
        if self.on_script_error not in ON_SCRIPT_ERROR:
            raise SettingsError(f"SSA_ON_SCRIPT_ERROR={self.on_script_error!r} must be 'fail' or 'skip'")
        if not self.issuer.startswith(("http://", "https://")):
            raise SettingsError(f"SSA_ISSUER={self.issuer!r} must be an http(s) URL")
        for attr in self.custom_attributes:
            if not attr or attr in RESERVED_ATTRIBUTES:
                raise SettingsError(f"SSA_CUSTOM_ATTRIBUTES: {attr!r} is empty or a built-in SSA field")

    def _validate_key_encryption(self) -> None:
        for name in ("key_encryption_key", "key_encryption_key_previous"):
            value = getattr(self, name)
            if value and secret_refs.parse(value) is None:  # never echoed: it may be the key itself
                raise SettingsError(f"SSA_{name.upper()} must be a reference, {secret_refs.RULE}, "
                                    "never the key itself")
        if self.key_encryption_key_previous and not self.key_encryption_key:
            raise SettingsError("SSA_KEY_ENCRYPTION_KEY_PREVIOUS needs SSA_KEY_ENCRYPTION_KEY (the key "
                                "records are rewritten under)")

    def _validate_signing_backend(self) -> None:
        if self.signing_backend not in SIGNING_BACKENDS:
            raise SettingsError(f"SSA_SIGNING_BACKEND={self.signing_backend!r} must be 'software' "
                                "or 'pkcs11'")
        if self.pkcs11_pin and secret_refs.parse(self.pkcs11_pin) is None:  # never echoed: it is the PIN
            raise SettingsError(f"SSA_PKCS11_PIN must be a reference, {secret_refs.RULE}, "
                                "never the PIN itself")
        if self.signing_backend == "pkcs11":
            for name in ("pkcs11_module", "pkcs11_token_label", "pkcs11_pin"):
                if not getattr(self, name):
                    raise SettingsError(f"signing_backend 'pkcs11' needs SSA_{name.upper()}")

    def _validate_external(self) -> None:
        """The external authorization server's settings (``external_tokens.py``)."""
        for name in ("external_issuer", "external_jwks_uri", "introspection_endpoint"):
            value = getattr(self, name)
            if value and not https_or_loopback(value):
                raise SettingsError(f"SSA_{name.upper()}={value!r} must be an https URL "
                                    "(or http to a loopback address)")
        if self.external_issuer and not self.external_audience:
            raise SettingsError("SSA_EXTERNAL_ISSUER needs SSA_EXTERNAL_AUDIENCE (the aud its tokens carry "
                                "for this server)")
        if self.external_jwks_uri and not self.external_issuer:
            raise SettingsError("SSA_EXTERNAL_JWKS_URI needs SSA_EXTERNAL_ISSUER")
        for name in ("external_scope_claim", "external_client_claim"):
            if not getattr(self, name):
                raise SettingsError(f"SSA_{name.upper()} must name a claim")
        if self.introspection_endpoint and not (self.introspection_client_id
                                                and self.introspection_client_secret):
            raise SettingsError("SSA_INTROSPECTION_ENDPOINT needs SSA_INTROSPECTION_CLIENT_ID and "
                                "SSA_INTROSPECTION_CLIENT_SECRET")
        credentials = self.introspection_client_id or self.introspection_client_secret
        if credentials and not self.introspection_endpoint:
            raise SettingsError("SSA_INTROSPECTION_CLIENT_ID and _SECRET need SSA_INTROSPECTION_ENDPOINT")
        if self.introspection_client_secret and secret_refs.parse(self.introspection_client_secret) is None:
            raise SettingsError(f"SSA_INTROSPECTION_CLIENT_SECRET must be a reference, {secret_refs.RULE}, "
                                "never the secret itself")  # never echoed
        for name in ("external_leeway", "introspection_cache_seconds"):
            if getattr(self, name) < 0:
                raise SettingsError(f"SSA_{name.upper()}={getattr(self, name)} must not be negative")
        for name in ("external_timeout", "external_jwks_refetch_interval", "external_jwks_max_age"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"SSA_{name.upper()}={getattr(self, name)} must be greater than 0")
        if not self.token_endpoint_enabled and not (self.external_issuer or self.introspection_endpoint):
            raise SettingsError("SSA_TOKEN_ENDPOINT_ENABLED=false needs SSA_EXTERNAL_ISSUER or "
                                "SSA_INTROSPECTION_ENDPOINT: no token could call the SSA API")

    @property
    def external_tokens(self) -> bool:
        """Whether tokens of an external authorization server are accepted."""
        return bool(self.external_issuer or self.introspection_endpoint)

    def _validate_role_scopes(self) -> None:
        name = "SSA_MAP_SOFTWARE_ROLES_TO_SCOPES"
        for role, scopes in self.map_software_roles_to_scopes.items():
            if not isinstance(role, str) or not role:
                raise SettingsError(f"{name}: a role must be a non-empty string, not {role!r}")
            for scope in scopes:
                if not isinstance(scope, str) or not _SCOPE_TOKEN.fullmatch(scope):
                    raise SettingsError(f"{name}: {scope!r} (role {role!r}) is not a scope token "
                                        "(printable ASCII without spaces, quotes or backslashes)")
        if self.map_software_roles_to_scopes and "scope" in self.custom_attributes:
            raise SettingsError(f"{name} makes the scope claim: 'scope' cannot also be a custom attribute "
                                "(SSA_CUSTOM_ATTRIBUTES)")

    @property
    def uses_postgres(self) -> bool:
        return self.store_url.startswith(POSTGRES_SCHEMES)

    def public_dict(self) -> dict[str, Any]:
        """The effective settings as JSON-ready values, secrets masked (``config show``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = {k: list(v) for k, v in value.items()}
            if f.name in SECRET_FIELDS and value:
                value = redact_url(str(value))
            out[f.name] = value
        return out

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (derived defaults recomputed when not given)."""
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        current.update(changes)
        return Settings(**current)


def https_or_loopback(url: str) -> bool:
    """An https URL with a host, or http to a loopback address (tests, a sidecar)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return False
    if parts.scheme == "https" and host:
        return True
    if parts.scheme != "http":
        return False
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """The URL without its password (``config show``, messages and logs): the password of the
    user part and any ``password=`` parameter become ``***``; the rest stays readable."""
    scheme, sep, rest = url.partition("://")
    at = rest.split("?", 1)[0].rfind("@")
    if sep and at >= 0:
        creds, tail = rest[:at], rest[at:]
        user = creds.split(":", 1)[0]
        url = f"{scheme}://{user}:***{tail}" if ":" in creds else url
    return re.sub(r"(password=)[^&\s]*", r"\1***", url)


def _cast(name: str, raw: Any, kind: Any) -> Any:
    """Turn an environment string or a TOML value into the field's type, or fail clearly."""
    try:
        if kind is bool or kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind in (int, "int"):
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if kind in (float, "float"):
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if kind in (Path, "Path"):
            return Path(str(raw))
        if kind in ("tuple[str, ...]",):
            items = raw if isinstance(raw, list) else str(raw).split(",")
            return tuple(str(i).strip() for i in items if str(i).strip())
        if kind == "dict[str, tuple[str, ...]]":
            return _role_scopes(name, raw)
        if kind in (str, "str"):
            if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
                raise ValueError
            return str(raw)
    except (TypeError, ValueError):
        pass
    kind_name = kind if isinstance(kind, str) else kind.__name__
    raise SettingsError(f"SSA_{name.upper()}={raw!r} is not a valid {kind_name}")


def _role_scopes(name: str, raw: Any) -> dict[str, tuple[str, ...]]:
    """A TOML table, or (the environment) a JSON object, of role -> list of scopes."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise SettingsError(f"SSA_{name.upper()} must be a JSON object of role -> list of scopes, "
                                'e.g. {"payments": ["payments", "openid"]}') from None
    if not isinstance(raw, dict):
        raise SettingsError(f"SSA_{name.upper()} must be a table (object) of role -> list of scopes")
    out = {}
    for role, scopes in raw.items():
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise SettingsError(f"SSA_{name.upper()}: the scopes of role {role!r} must be a list of strings")
        out[str(role)] = tuple(scopes)
    return out


_FIELD_TYPES = {f.name: f.type for f in fields(Settings)}


def load_settings(
    cli: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Settings:
    """Build the settings: CLI flags > SSA_* environment > config file > defaults.

    ``cli`` holds only the flags the user gave (None values are ignored).  The config file
    comes from ``config_file`` or else from ``SSA_CONFIG``.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_file or env.get("SSA_CONFIG")
    if path:
        values.update(_read_config_file(Path(path)))
    for name in _FIELD_TYPES:
        key = f"SSA_{name.upper()}"
        if key in env:
            values[name] = _cast(name, env[key], _FIELD_TYPES[name])
    for name, value in (cli or {}).items():
        if value is not None:
            if name not in _FIELD_TYPES:
                raise SettingsError(f"unknown setting {name!r}")
            values[name] = _cast(name, value, _FIELD_TYPES[name])
    return Settings(**values)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(f"config file {path} cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"config file {path} is not valid TOML: {e}") from None
    section = data.pop("ssa", {})
    if not isinstance(section, dict):
        raise SettingsError(f"config file {path}: [ssa] must be a table")
    data.update(section)
    out: dict[str, Any] = {}
    for key, raw in data.items():
        if key not in _FIELD_TYPES:
            raise SettingsError(f"config file {path}: unknown setting {key!r}")
        out[key] = _cast(key, raw, _FIELD_TYPES[key])
    return out

