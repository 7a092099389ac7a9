"""The admin search's filter language (``store/search.py``): the same results on both stores, and
every malformed filter refused with a message that names the term."""

from __future__ import annotations

import pytest

from ssa_server.store import search
from test_store import make_store, run  # noqa: F401  (make_store: the fixture over both stores)

BASE = 1_700_000_000  # 2023-11-14T22:13:20Z
DAY = 86_400


def rec(jti: str, created: int, **fields) -> dict:
    record = {"jti": jti, "org_id": "acme", "description": "", "software_id": "sw",
              "software_roles": ["password"], "grant_types": ["client_credentials"], "one_time_use": True,
              "rotate_ssa": True, "lifetime": None, "custom": {}, "created_at": created,
              "expiration": BASE + 2 * DAY, "status": "ACTIVE", "creator_id": "c1", "iss": "http://x"}
    record.update(fields)
    return record


RECORDS = [
    rec("s01", BASE, custom={"tenant": "t1", "n": 5}, description="first of acme"),
    rec("s02", BASE, custom={"n": 5.0}, status="REVOKED", creator_id="c2"),
    rec("s03", BASE + 10, org_id="beta", custom={"n": "5"}, software_roles=["admin", "password"],
        lifetime=3600),
    rec("s04", BASE + 20, org_id="beta", custom={"n": True, "tags": ["a", "b"]}, one_time_use=False,
        rotate_ssa=False, status="USED"),
    rec("s05", BASE + DAY, org_id="gamma", custom={"tags": [["a"]], "big": 2**70}, status="EXPIRED",
        expiration=BASE + 100, creator_id="c2"),
    rec("s06", BASE + 2 * DAY, org_id="gamma", custom={"tenant": None, "f": 1e16, "text": "żółw ✓"},
        software_roles=[], grant_types=[], lifetime=60),
    rec("s07", BASE + 30, org_id="Acme", custom={"tenant": "T1", "n": -3}, description="a, b"),
    rec("s08", BASE + 40, custom={"deep": {"x": 1}, "n": 10**20}),
]
del RECORDS[7]["lifetime"]  # absent, not null
ALL = ["s01", "s02", "s03", "s04", "s07", "s08", "s05", "s06"]  # oldest first, then by jti

# Each filter and what it must match, worked out by hand from RECORDS (not by either store).
CASES = [
    ("", ALL),
    ("org_id=acme", ["s01", "s02", "s08"]),
    ("org_id!=acme", ["s03", "s04", "s07", "s05", "s06"]),
    ("org_id>=beta", ["s03", "s04", "s05", "s06"]),
    ("org_id<a", ["s07"]),  # by code point: "Acme" < "a", whatever the database's collation says
    ("status=ACTIVE", ["s01", "s03", "s07", "s08", "s06"]),
    ("status!=ACTIVE, created_at<2023-11-15", ["s02", "s04"]),
    ("created_at>=2023-11-15T22:13:20Z", ["s05", "s06"]),
    ("created_at>=2023-11-16T00:13:20+02:00", ["s05", "s06"]),
    ('created_at>1700000000,created_at<="2023-11-14T22:13:50"', ["s03", "s04", "s07"]),
    ("expiration<1700000101", ["s05"]),
    ("lifetime=null", ["s01", "s02", "s04", "s07", "s08", "s05"]),
    ("lifetime!=null", ["s03", "s06"]),
    ("lifetime>100", ["s03"]),
    ("lifetime<=60", ["s06"]),
    ("lifetime=3600", ["s03"]),
    ("one_time_use=false", ["s04"]),
    ("rotate_ssa=false", ["s04"]),
    ("rotate_ssa!=false", ["s01", "s02", "s03", "s07", "s08", "s05", "s06"]),
    ("software_roles=admin", ["s03"]),
    ("software_roles!=password", ["s06"]),
    ("grant_types=client_credentials", ["s01", "s02", "s03", "s04", "s07", "s08", "s05"]),
    ("custom.n=5", ["s01", "s02"]),  # 5.0 is 5; "5" and true are not
    ('custom.n="5"', ["s03"]),
    ("custom.n=true", ["s04"]),
    ("custom.n!=5", ["s03", "s04", "s07", "s08", "s05", "s06"]),
    ("custom.n>=5", ["s01", "s02", "s08"]),
    ("custom.n>0", ["s01", "s02", "s08"]),  # true is no number
    ("custom.n>4.5", ["s01", "s02", "s08"]),
    ("custom.n<0", ["s07"]),
    ("custom.n>=5,custom.n<=5", ["s01", "s02"]),
    ("custom.tags=a", ["s04"]),  # a list holds it; a list in a list does not
    ("custom.tags!=a", ["s01", "s02", "s03", "s07", "s08", "s05", "s06"]),
    ("custom.tenant=null", ["s02", "s03", "s04", "s08", "s05", "s06"]),
    ("custom.tenant!=null", ["s01", "s07"]),
    ("tenant=t1", ["s01"]),  # a configured attribute by its bare name
    ("custom.tenant>=T", ["s01", "s07"]),
    ("custom.tenant<t", ["s07"]),
    ("custom.text~ółw", ["s06"]),
    ('description~"a, b"', ["s07"]),
    ("description~acme", ["s01"]),
    ("custom.big=1180591620717411303424", ["s05"]),
    ("custom.big>1180591620717411303423", ["s05"]),
    ("custom.f=1e16", ["s06"]),
    ("custom.f>=10000000000000000", ["s06"]),
    ("custom.deep=1", []),
    ("jti=s03", ["s03"]),
    ("jti=s03,org_id=acme", []),
    ("creator_id=c2", ["s02", "s05"]),
    ("creator_id=c2, status=EXPIRED", ["s05"]),
    ("iss=http://x", ALL),
    ("software_id~s", ALL),
    ("org_id=acme,custom.n>=5,status=ACTIVE", ["s01", "s08"]),
    ("org_id = beta , status = USED", ["s04"]),
]


def test_every_filter_finds_the_same_records_on_both_stores(make_store):
    async def go():
        s = await make_store()
        await s.add_ssas([dict(r) for r in RECORDS])
        found = {}
        for where, _ in CASES:
            records = await s.search_ssas(search.parse(where, ("tenant",)), search.MAX_LIMIT)
            found[where] = [r["jti"] for r in records]
        first = await s.search_ssas(search.parse(""), 3)
        several = await s.search_ssas(search.parse(["org_id=acme", "status=ACTIVE"]), 10)
        (s01,) = await s.search_ssas(search.parse("jti=s01"), 10)
        await s.close()
        return found, first, several, s01

    found, first, several, s01 = run(go())
    assert found == {where: expected for where, expected in CASES}
    assert [r["jti"] for r in first] == ALL[:3]  # the limit keeps the oldest
    assert [r["jti"] for r in several] == ["s01", "s08"]  # several texts: every term of each
    assert s01 == RECORDS[0]  # the whole record, as stored


@pytest.mark.parametrize("where,problem", [
    ("org=acme", "Filter term 1: org is neither an SSA field nor a configured custom attribute"),
    ("org_id", "an operator"),
    ("org_id=", "a value must follow"),
    ("org_id>", "a value must follow"),
    ("=acme", "a field name is missing"),
    ("custom.=x", "a field name is missing"),
    ("org_id=a,", "Filter term 2: a field name is missing"),
    ("status=active", "status is one of ACTIVE, USED, REVOKED, EXPIRED"),
    ("one_time_use=yes", "one_time_use is true or false"),
    ("one_time_use<true", "its operators are =, !="),
    ("created_at>=yesterday", "created_at compares with an integer (epoch seconds) or an ISO 8601 date"),
    ("created_at>=2024-01-01T00:00:00.5", "compares with an integer"),
    ("created_at=null", "compares with an integer"),
    ("lifetime>null", "lifetime compares with an integer or null"),
    ("lifetime=1.5", "lifetime compares with an integer or null"),
    ("software_roles~pass", "software_roles is a list: its operators are =, !="),
    ("custom.n~5", "contains compares text"),
    ("custom.n>true", "ranges compare numbers or text"),
    ("custom.n<null", "null compares only with = and !="),
    ("custom.n=1e999", "beyond the float range"),
    ('description="unterminated', "not closed"),
    ('description="\\x"', "not a JSON string"),
    ('description="\\u0000"', "NUL"),
    ('description="\\ud800"', "not UTF-8"),
    ('description="a"b', "a comma must follow"),
    ("org_id=a\x00", "NUL"),
    ("org_id=\ud800", "not UTF-8"),
    (",".join(["org_id=a"] * 17), "more than 16 terms"),
    ("description~" + "x" * 1100, "longer than 1024 characters"),
])
def test_a_bad_filter_is_refused_with_what_is_wrong(where, problem):
    with pytest.raises(search.FilterError) as caught:
        search.parse(where)
    assert problem in str(caught.value)


def test_limits_count_every_text_together():
    search.parse([",".join(["org_id=a"] * 8)] * 2)  # 16 terms
    with pytest.raises(search.FilterError, match="more than 16 terms"):
        search.parse([",".join(["org_id=a"] * 8)] * 2 + ["jti=x"])
    with pytest.raises(search.FilterError, match="longer than 1024"):
        search.parse(["description~" + "x" * 600] * 2)


def test_values_and_attribute_names_reach_sql_as_parameters_only():
    value, name = "x'); DROP TABLE ssa; --", "x');DROP_TABLE_ssa;--"
    condition, params = search.to_sql(search.parse([f'org_id="{value}"', f"custom.{name}=1"]), ("org_id",))
    assert "DROP" not in condition and value in params and name in params


def test_text_ranges_go_by_code_point_whatever_the_database_collates(request):
    """On a database whose collation sorts "Acme" after "a" (ICU), the ranges still compare by code
    point, as the embedded store does."""
    import asyncio
    import uuid

    import psycopg

    from conftest import with_database
    from ssa_server.store.postgres import PgStore

    server = request.getfixturevalue("pg_server")
    name = f"ssa_icu_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER icu "
                     "ICU_LOCALE 'en' LOCALE 'C.utf8'")
    url = with_database(server, name)
    cases = [c for c in CASES if c[0] in ("org_id<a", "org_id>=beta", "custom.tenant>=T", "custom.tenant<t")]

    async def go():
        store = PgStore(url)
        await store.open()
        try:
            await store.add_ssas([dict(r) for r in RECORDS])
            return {where: [r["jti"] for r in await store.search_ssas(search.parse(where), 10)]
                    for where, _ in cases}
        finally:
            await store.close()

    try:
        with psycopg.connect(url) as conn:  # the collation this test is about
            assert conn.execute("SELECT 'Acme' < 'a', 'T1' < 't'").fetchone() == (False, False)
        assert asyncio.run(go()) == dict(cases)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_scanning_search_lets_other_requests_run_meanwhile(tmp_path):
    """The embedded store tests a scan's documents a slice at a time, with turns of the event loop
    in between (30,000 SSAs: six slices)."""
    import asyncio

    from test_store import opened

    many = [rec(f"m{i:05d}", BASE + i, custom={"tenant": "t1" if i % 2 else "t2"}) for i in range(30_000)]

    async def go():
        s = await opened(tmp_path)
        await s.add_ssas(many)
        turns = 0
        done = False

        async def other_request():
            nonlocal turns
            while not done:
                turns += 1
                await asyncio.sleep(0)

        other = asyncio.create_task(other_request())
        await asyncio.sleep(0)
        before = turns
        found = await s.search_ssas(search.parse("custom.tenant=t1"), search.MAX_LIMIT)
        during = turns - before
        done = True
        await other
        await s.close()
        return found, during

    found, during = run(go())
    assert [r["jti"] for r in found] == [f"m{i:05d}" for i in range(1, 2 * search.MAX_LIMIT, 2)]
    assert during >= 5
