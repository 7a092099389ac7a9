"""What a script's output is held to: the rules the sandbox worker applies after each script
and the server applies again (it does not trust the worker).  Above all, what a create hook may
change in the SSA it hands back, before the server signs it:

- The claims the server owns (``jti``, ``iss``, ``iat``) keep their value *and* type: ``1.0`` is
  not ``1``, ``True`` is not ``1``.
- Every JOSE header parameter name registered with IANA is the server's: a script may not add,
  change (value or type) or remove one.  ``crit``, ``b64``, ``zip`` or ``typ`` change how a
  verifier processes the token; ``jku``, ``x5u``, ``jwk``, ``x5c`` point relying parties at keys
  the server does not hold.  Only unregistered (private) names are the scripts'.

And how a hook's scripts run as a chain, in file-name order, the same in the worker (a chain in
one round trip) and in the server (``ScriptHost``, one call per script, or applying a chain's
answers): what stops a chain, which failures refuse the request, what the next script gets.

No pluggy import and nothing of the server but the plain JSON copy (``jsonvalues.clone``): the
sandbox worker imports this module (``tests/test_layers.py``).
"""

from __future__ import annotations

from typing import Any

from .jsonvalues import clone

HOOKS = ("create", "get", "revoke")
PROTECTED_CLAIMS = ("jti", "iss", "iat", "status")  # status: the SSA's Token Status List entry
SIGNER_HEADER = ("alg", "kid")  # written by the signer from the active key
# What one call may log (``context.log`` and ``print`` together); the rest is counted as dropped.
MAX_LOG_LINES, MAX_LOG_LINE = 20, 500

# IANA "JSON Web Signature and Encryption Header Parameters" (https://www.iana.org/assignments/jose),
# as registered by RFC 7515 (JWS), 7516 (JWE), 7518 (JWA), 7519 (JWT, replicated claims), 7797
# (b64), 8225 (PASSporT), 8555 (ACME), 9321 (signature validation token) and OpenID Federation 1.0
# (trust_chain): the snapshot of those documents' registrations, checked by hand, not fetched.
# Names are case-sensitive (RFC 7515 §4): "Typ" is not "typ".
REGISTERED_HEADER = frozenset({
    "alg", "jku", "jwk", "kid", "x5u", "x5c", "x5t", "x5t#S256", "typ", "cty", "crit",  # RFC 7515
    "enc", "zip",  # RFC 7516
    "epk", "apu", "apv", "iv", "tag", "p2s", "p2c",  # RFC 7518
    "iss", "sub", "aud",  # RFC 7519 §5.3
    "b64",  # RFC 7797
    "ppt",  # RFC 8225
    "url", "nonce",  # RFC 8555
    "svt",  # RFC 9321
    "trust_chain",  # OpenID Federation 1.0
})

_ABSENT = object()


_CONTAINERS = (dict, list)


def same(a: Any, b: Any) -> bool:
    """Equal by type and value, all the way down (JSON values: ``1.0`` differs from ``1``)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def before_create(header: dict[str, Any], claims: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What ``create_change`` compares with: the registered header parameters and the protected
    claims as they are now (containers copied: a script may change them in place)."""
    return ({k: clone(v) if type(v) in _CONTAINERS else v
             for k, v in header.items() if k in REGISTERED_HEADER},
            {k: clone(claims[k]) if type(claims[k]) in _CONTAINERS else claims[k]
             for k in PROTECTED_CLAIMS if k in claims})


def header_change(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    """Why ``after`` breaks the header rules, naming the parameter; None when it keeps them.
    ``before`` needs to hold only its registered parameters (``before_create``)."""
    for name, value in before.items():
        if name in REGISTERED_HEADER:
            now = after.get(name, _ABSENT)
            if now is _ABSENT:
                return f"the registered header parameter '{name}' cannot be removed"
            if not same(value, now):
                return f"the registered header parameter '{name}' cannot be changed"
    for name in after:
        if name in REGISTERED_HEADER and name not in before:
            return (f"the registered header parameter '{name}' cannot be set by a script "
                    "(only unregistered names may be)")
    return None


def claims_change(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    """Why ``after`` changed a server-owned claim (value, type or presence); None when it did not."""
    for name in PROTECTED_CLAIMS:
        was, now = before.get(name, _ABSENT), after.get(name, _ABSENT)
        if was is not now and not same(was, now):  # an absent one stays absent, or it differs
            return f"the server-owned claim '{name}' cannot be changed"
    return None


def create_change(header: dict[str, Any], claims: dict[str, Any], new_header: Any,
                  new_claims: Any) -> str | None:
    """The first rule a create hook's result breaks, or None.  ``header`` and ``claims`` are
    the hook's input as it was (unchanged objects, or ``before_create``'s copies)."""
    if not isinstance(new_header, dict) or not isinstance(new_claims, dict):
        return "jwt.header and jwt.claims must stay dicts"
    return claims_change(claims, new_claims) or header_change(header, new_header)


# --- chains: the worker's ``_chain`` and the server's ``ScriptHost`` both follow these ---
def may_refuse(hook: str) -> bool:
    """Whether a script of ``hook`` can refuse the request (a denial, a failure, a busy
    sandbox): create and get can; a revocation stands whatever its scripts do (logged only)."""
    return hook != "revoke"


def failure_refuses(hook: str, on_error: str) -> bool:
    """Whether a script's failure (exception, limit, timeout, invalid result) refuses the
    request and ends the chain: create and get with ``on_script_error = "fail"``.  Otherwise
    the failure is logged and skipped: that script's changes are dropped, the next script gets
    what the failed one got."""
    return on_error == "fail" and may_refuse(hook)


def stops_chain(hook: str, result: dict[str, Any]) -> bool:
    """Whether a script's answer ends its hook's chain: ``False`` returned, for every hook (its
    changes kept), or a denial where a denial refuses (not for revoke)."""
    return result["result"] is False or (bool(result.get("denied")) and may_refuse(hook))


# What the next script of a chain gets of a script's answer: create its header and claims, get
# its list; revoke nothing: each revoke script sees the list as it was revoked.
PASSED_ON: dict[str, tuple[str, ...]] = {"create": ("header", "claims"), "get": ("ssa_list",), "revoke": ()}


def passes_answer(hook: str) -> bool:
    """Whether the next script of a chain gets a script's answer, or the chain's input (revoke)."""
    return bool(PASSED_ON[hook])


def next_payload(hook: str, result: dict[str, Any]) -> dict[str, Any] | None:
    """The next script's input from a script's answer (``PASSED_ON``); None when it gets the
    chain's input instead."""
    keys = PASSED_ON[hook]
    if not keys:
        return None
    passed = {}
    for key in keys:  # a loop, not a comprehension: this runs for every step of a chain
        passed[key] = result[key]
    return passed


def replays_input(hook: str, skip_errors: bool) -> bool:
    """Whether a later script may need the chain's input again: when scripts do not pass their
    answers on, and after a skipped failure (the next script gets what the failed one got)."""
    return skip_errors or not passes_answer(hook)
