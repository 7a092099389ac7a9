"""Isolation between the scripts of a chain and between calls, through a real server (the app
with its sandbox workers): no script's code runs during another script's step or changes what
that step checked, and nothing one call stores in module state reaches the next call (issue 10,
findings 1 and 5)."""

from __future__ import annotations

import pytest

from tests.test_scripts_http import ADMIN, harness  # noqa: F401  (pytest fixture)

# Script A parks a generator suspended in try/finally in a reference cycle: only the cyclic GC
# can finalize it, and its finally block is A's code.  Freeing the lists it built first brings
# the collector's allocation count back to about zero, so the next collection comes only once
# the next step has allocated its own objects (with the collector on, that is during B's step).
PARK = '''
def create(jwt, context):
    roles = jwt.claims["software_roles"]
    def later():
        try:
            yield 1
        finally:
            {finally_body}
    warm = [[i] for i in range(3000)]
    warm = None
    g = later()
    next(g)
    loop = [g]
    loop.append(loop)
    return True
'''
# Script B, a deny policy: checks the roles, then does work that allocates (the collector runs).
DENY_ADMIN = '''
def create(jwt, context):
    if "admin" in jwt.claims["software_roles"]:
        context.deny("access_denied", "the admin role is not issued here")
        return False
    busy = [[i] for i in range(5000)]
    jwt.claims["checked_by"] = "2_deny"
    return True
'''


def roles_of(h, response) -> list[str]:
    return h.claims(response)["software_roles"]


# The same generator parked where only the end of the call drops it: in module state (a global,
# a mutable default argument), whose copy for this call goes with the call.
PARK_IN_STATE = {
    "global": ('PARKED = None\n', 'global PARKED\n    PARKED = g', ''),
    "default": ('', 'keep.append(g)', ', keep=[]'),
}
PARK_STATE = '''
{module}
def create(jwt, context{default}):
    roles = jwt.claims["software_roles"]
    def later():
        try:
            yield 1
        finally:
            roles.append("admin")
    g = later()
    next(g)
    {park}
    return True
'''


@pytest.mark.parametrize("where", ["cycle"] + sorted(PARK_IN_STATE))
def test_a_finalizer_cannot_change_what_a_later_policy_checked(harness, where):
    if where == "cycle":
        park = PARK.format(finally_body='roles.append("admin")')
    else:
        module, stash, default = PARK_IN_STATE[where]
        park = PARK_STATE.format(module=module, park=stash, default=default)
    h = harness({"1_park.py": park, "2_deny.py": DENY_ADMIN})
    for _ in range(3):
        r = h.create(org_id="o", software_roles=["password"])
        assert r.status_code == 201, r.text
        claims = h.claims(r)
        assert claims["checked_by"] == "2_deny"
        assert claims["software_roles"] == ["password"]  # signed as the policy saw it


@pytest.mark.parametrize("finally_body, kind", [
    ("while True:\n                pass", ("timeout", "limit")),
    ('raise ValueError("from the finalizer")', ("exception",)),
])
def test_a_finalizer_failure_is_blamed_on_its_own_script(harness, finally_body, kind):
    h = harness({"1_park.py": PARK.format(finally_body=finally_body), "2_deny.py": DENY_ADMIN},
                script_timeout=0.5, script_cpu=0.3)
    before = h.count()
    r = h.create(org_id="o", software_roles=["password"])
    assert r.status_code == 502, r.text
    assert "1_park" in r.json()["error_description"], r.text
    assert h.count() == before
    listing = {s["name"]: s for s in h.client.get("/scripts", headers=h.auth).json()}
    assert listing["1_park"]["failures"] == 1 and listing["1_park"]["last_error"].split(": ")[1] in kind
    assert listing["2_deny"]["failures"] == 0


def test_a_finalizer_failure_in_skip_mode_drops_only_that_script(harness):
    h = harness({"1_park.py": PARK.format(finally_body='raise ValueError("x")'), "2_deny.py": DENY_ADMIN},
                on_script_error="skip")
    r = h.create(org_id="o", software_roles=["password"])
    assert r.status_code == 201, r.text
    assert h.claims(r)["checked_by"] == "2_deny" and h.claims(r)["software_roles"] == ["password"]


def test_finalizers_that_keep_making_garbage_fail_their_own_script(harness):
    h = harness({"1_spawn.py": '''
def park():
    def later():
        try:
            yield 1
        finally:
            park()
    g = later()
    next(g)
    loop = [g]
    loop.append(loop)
def create(jwt, context):
    park()
    return True
''', "2_deny.py": DENY_ADMIN})
    r = h.create(org_id="o", software_roles=["password"])
    assert r.status_code == 502 and "1_spawn" in r.json()["error_description"], r.text
    listing = {s["name"]: s for s in h.client.get("/scripts", headers=h.auth).json()}
    assert "garbage" in listing["1_spawn"]["last_error"] and listing["2_deny"]["failures"] == 0, listing


def test_each_step_of_a_chain_gets_its_own_copy_in_one_round_trip(harness, caplog):
    """In one worker round trip (no worker lost, nothing run again), each script gets its own
    parse of the previous script's output, and a skipped failure leaves the next script the
    input the failed one got."""
    keep = ('def create(jwt, context):\n    jwt.claims["trail"] = jwt.claims.get("trail", "") + "{tag}"\n'
            '    return True\n')
    spoil = ('def create(jwt, context):\n    jwt.claims["trail"] = "spoiled"\n'
             '    jwt.claims["software_roles"].append("admin")\n    raise ValueError("no")\n')
    h = harness({"1_a.py": keep.format(tag="a"), "2_spoil.py": spoil, "3_c.py": keep.format(tag="c")},
                on_script_error="skip")
    with caplog.at_level("WARNING"):
        r = h.create(org_id="o", software_roles=["password"])
    assert r.status_code == 201, r.text
    assert h.claims(r)["trail"] == "ac" and h.claims(r)["software_roles"] == ["password"]
    assert not [rec for rec in caplog.records if "worker was lost" in rec.getMessage()]


# --- module state: each call starts from the state right after load (finding 5) ---

def second_client(h) -> dict[str, str]:
    record, secret = h.client.portal.call(h.server.clients.create, [ADMIN], "tenant-b")
    token = h.client.post("/token", data={"grant_type": "client_credentials"},
                          auth=(record["client_id"], secret)).json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


STASH = {
    "global_rebind": '''
LAST = ""
def create(jwt, context):
    global LAST
    jwt.claims["leak"] = LAST
    LAST = context.client_id + " " + jwt.claims["org_id"] + " " + jwt.claims["jti"]
    return True
''',
    "module_list": '''
SEEN = []
def create(jwt, context):
    jwt.claims["leak"] = " ".join(SEEN)
    SEEN.append(context.client_id + " " + context.request["headers"].get("x-forwarded-access-token", ""))
    return True
''',
    "module_dict": '''
CACHE = {"n": 0}
def create(jwt, context):
    jwt.claims["leak"] = " ".join(str(v) for k, v in sorted(CACHE.items()) if k != "n")
    CACHE[context.client_id] = jwt.claims["org_id"]
    return True
''',
    "module_set": '''
ORGS = set()
def create(jwt, context):
    jwt.claims["leak"] = " ".join(sorted(ORGS))
    ORGS.add(jwt.claims["org_id"])
    return True
''',
    "closure_cell": '''
def make():
    box = []
    def remember(value):
        seen = " ".join(box)
        box.append(value)
        return seen
    return remember
remember = make()
def create(jwt, context):
    jwt.claims["leak"] = remember(jwt.claims["org_id"])
    return True
''',
    "mutable_default": '''
def remember(value, acc=[]):
    seen = " ".join(acc)
    acc.append(value)
    return seen
def create(jwt, context):
    jwt.claims["leak"] = remember(jwt.claims["org_id"])
    return True
''',
    "nested_in_tuple": '''
STATE = ({"orgs": []}, "constant")
def create(jwt, context):
    jwt.claims["leak"] = " ".join(STATE[0]["orgs"])
    STATE[0]["orgs"].append(jwt.claims["org_id"])
    return True
''',
}


@pytest.mark.parametrize("name", sorted(STASH))
def test_module_state_does_not_carry_one_clients_request_into_another(harness, name):
    h = harness({f"{name}.py": STASH[name]})
    other = second_client(h)
    first = h.client.post("/ssa", json={"org_id": "tenant-a"}, headers=dict(h.auth, **{
        "x-forwarded-access-token": "secret-of-a"}))
    assert first.status_code == 201, first.text
    second = h.client.post("/ssa", json={"org_id": "tenant-b"}, headers=other)
    assert second.status_code == 201, second.text
    assert h.claims(second)["leak"] == ""  # tenant B's SSA holds nothing of tenant A's request
    again = h.create(org_id="tenant-a")
    assert h.claims(again)["leak"] == ""  # nor does a later call of the same client


def test_module_state_keeps_its_shape_and_aliasing_in_every_call(harness):
    h = harness({"shape.py": '''
A = [1, 2]
B = {"a": A, "again": A}
T = (A, "x")
def f(x, acc=A):
    return acc is A
def create(jwt, context):
    A.append(3)
    jwt.claims["shape"] = [B["a"] is A, B["again"] is A, T[0] is A, f(1), len(A), B["a"]]
    return True
'''})
    for _ in range(2):
        r = h.create()
        assert r.status_code == 201, r.text
        assert h.claims(r)["shape"] == [True, True, True, True, 3, [1, 2, 3]]


@pytest.mark.parametrize("source, what", [
    ("IDS = iter(range(100))\n", "IDS"),
    ("GEN = (i for i in range(100))\n", "GEN"),
    ("L = []\nADD = L.append\n", "ADD"),
    ("def g():\n    yield 1\nPARKED = [g()]\n", "PARKED"),
    ("ZIPPED = zip([1], [2])\n", "ZIPPED"),
])
def test_module_state_that_cannot_be_reset_is_refused_at_load(harness, source, what):
    h = harness({"s.py": source + "def create(jwt, context):\n    jwt.claims['n'] = 1\n    return True\n"})
    (entry,) = h.client.get("/scripts", headers=h.auth).json()
    assert entry["state"] == "error", entry
    assert what in entry["last_error"] and "reset" in entry["last_error"], entry["last_error"]
    assert "n" not in h.claims(h.create())


COUNTER = '''
COUNT = {"n": 0}
def create(jwt, context):
    COUNT["n"] = COUNT["n"] + 1
    jwt.claims["count"] = COUNT["n"]
    jwt.claims["config_keys"] = sorted(context.config)
    return True
'''


def test_state_kept_per_client_only_when_the_script_opts_in(harness):
    h = harness({"count.py": COUNTER, "count.toml": 'label = "x"\n\n[sandbox]\nkeep_state = "per_client"\n'})
    other = second_client(h)
    counts_a = [h.claims(h.create())["count"] for _ in range(3)]
    counts_b = [h.claims(h.client.post("/ssa", json={"org_id": "o"}, headers=other))["count"]
                for _ in range(2)]
    assert counts_a == [1, 2, 3]  # kept between the calls of one client (one worker here)
    assert counts_b == [1, 2]  # never across clients
    assert h.claims(h.create())["config_keys"] == ["label"]  # the [sandbox] table is not context.config


def test_without_the_opt_in_every_call_starts_fresh(harness):
    h = harness({"count.py": COUNTER})
    assert [h.claims(h.create())["count"] for _ in range(3)] == [1, 1, 1]


def test_an_unknown_sandbox_option_is_refused(harness):
    h = harness({"count.py": COUNTER, "count.toml": '[sandbox]\nkeep_state = "forever"\n'})
    (entry,) = h.client.get("/scripts", headers=h.auth).json()
    assert entry["state"] == "error" and "keep_state" in entry["last_error"], entry
