"""Several scripts on one hook run as one batch in one worker: the same semantics as one call
each (order, stop, failures naming the script, skip mode, isolation between scripts)."""

from __future__ import annotations

import pytest

from tests.test_scripts_http import harness  # noqa: F401  (pytest fixture)

ADD = ('def create(jwt, context):\n    jwt.claims["trail"] = jwt.claims.get("trail", "") + "{tag}"\n'
       '    return True\n')
HANG = "def create(jwt, context):\n    while True:\n        pass\n"
RAISE_AFTER_CHANGE = ('def create(jwt, context):\n    jwt.claims["trail"] = "clobbered"\n'
                      '    raise ValueError("no")\n')


def test_a_batch_chains_scripts_in_file_name_order(harness):
    h = harness({f"{i}_s.py": ADD.format(tag=t) for i, t in enumerate("abcde")})
    r = h.create()
    assert r.status_code == 201, r.text
    assert h.claims(r)["trail"] == "abcde"
    listing = {s["name"]: s for s in h.client.get("/scripts", headers=h.auth).json()}
    assert all(listing[f"{i}_s"]["calls"] == 1 for i in range(5))


@pytest.mark.parametrize("bad", [HANG, "def create(jwt, context):\n    x = 'a' * (10 ** 10)\n"])
def test_a_worker_lost_mid_chain_names_the_script(harness, bad):
    h = harness({"1_a.py": ADD.format(tag="a"), "2_bad.py": bad, "3_c.py": ADD.format(tag="c")},
                script_timeout=0.5)
    before = h.count()
    r = h.create()
    assert r.status_code == 502, r.text
    assert "2_bad" in r.json()["error_description"]
    assert h.count() == before
    r = h.create()  # the pool recovered
    assert r.status_code == 502 and "2_bad" in r.json()["error_description"]


def test_skip_mode_drops_only_the_failing_script(harness):
    h = harness({"1_a.py": ADD.format(tag="a"), "2_bad.py": RAISE_AFTER_CHANGE, "3_c.py": ADD.format(tag="c"),
                 "4_hang.py": HANG, "5_e.py": ADD.format(tag="e")},
                on_script_error="skip", script_timeout=0.5)
    r = h.create()
    assert r.status_code == 201, r.text
    assert h.claims(r)["trail"] == "ace"  # 2's partial change and 4 are dropped, the rest ran in order
    listing = {s["name"]: s for s in h.client.get("/scripts", headers=h.auth).json()}
    assert listing["2_bad"]["failures"] == 1 and listing["4_hang"]["failures"] == 1


def test_a_false_or_a_denial_stops_the_batch(harness):
    stop = ('def create(jwt, context):\n    jwt.claims["trail"] = jwt.claims.get("trail", "") + "s"\n'
            '    return False\n')
    deny = 'def create(jwt, context):\n    context.deny("access_denied", "not this org")\n    return True\n'
    h = harness({"1_a.py": ADD.format(tag="a"), "2_stop.py": stop, "3_c.py": ADD.format(tag="c")})
    r = h.create()
    assert r.status_code == 201 and h.claims(r)["trail"] == "as"
    h.write("2_stop.py", deny)
    h.wait_for(lambda: h.create().status_code == 403)
    listing = {s["name"]: s for s in h.client.get("/scripts", headers=h.auth).json()}
    assert listing["3_c"]["calls"] == 0  # it never ran: a False, then a denial, stopped every chain before it


def test_scripts_in_a_batch_cannot_reach_each_others_context(harness):
    spoil = ('def create(jwt, context):\n    context.request["headers"]["x-spoiled"] = "yes"\n'
             '    context.settings["issuer"] = "evil"\n    return True\n')
    look = ('def create(jwt, context):\n'
            '    jwt.claims["saw"] = [context.request["headers"].get("x-spoiled", "no"),'
            ' context.settings["issuer"]]\n    return True\n')
    h = harness({"1_spoil.py": spoil, "2_look.py": look})
    r = h.create()
    assert r.status_code == 201, r.text
    assert h.claims(r)["saw"] == ["no", h.settings.issuer]
