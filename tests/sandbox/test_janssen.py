"""Janssen-format scripts run unchanged (issue 13, part A): a file with a top-level ``class
ModifySsaResponse`` is adapted before the restricted compile (Python 2 prints, Java imports as
inert names, the class as functions over a per-worker instance namespace) and gets Janssen's
objects (``configurationAttributes``, the context getters, ``JSONArray``, ``List<Ssa>``).

Through the real sandbox (``ssa_script``), ``ssa-server scripts test`` and a live server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ssa_server.plugins.sandbox import ScriptError, ScriptRefused

# Janssen's own sample, in its style: class, Python 2 prints, imports, getValue2.
JANSSEN = '''\
# Janssen Project software is available under the Apache 2.0 License (2004).
# See http://www.apache.org/licenses/LICENSE-2.0.html
# Copyright (c) 2020, Janssen Project
#
from io.jans.model.custom.script.type.ssa import ModifySsaResponseType
from io.jans.service.cdi.util import CdiUtil
from io.jans.model.custom.script.type.ssa import ModifySsaResponseType as Base2
from java.lang import String
from org.json import JSONArray
import java

class ModifySsaResponse(ModifySsaResponseType):

    def __init__(self, currentTimeMillis):
        self.currentTimeMillis = currentTimeMillis
        self.calls = []

    def init(self, customScript, configurationAttributes):
        print "Modify ssa response script. Initializing ..."
        self.tenant = configurationAttributes.get("tenant").getValue2()
        self.has_region = configurationAttributes.containsKey("region")
        self.keys = sorted(configurationAttributes.keySet())
        self.name = customScript.getName()
        print "Modify ssa response script. Initialized successfully"
        return True

    def destroy(self, configurationAttributes):
        print "Modify ssa response script. Destroying ..."
        return True

    def getApiVersion(self):
        return 11

    def create(self, jsonWebResponse, context):
        print "Modify ssa response script. Modify idToken: %s" % jsonWebResponse
        jsonWebResponse.getHeader().setClaim("custom_header_name", "custom_header_value")
        jsonWebResponse.getClaims().setClaim("custom_claim_name", "custom_claim_value")
        jsonWebResponse.getClaims().setClaim("tenant", self.tenant)
        jsonWebResponse.getClaims().setClaim("client", context.getClient().getClientId())
        jsonWebResponse.getClaims().setClaim("issuer", context.getAppConfiguration().getIssuer())
        jsonWebResponse.getClaims().setClaim("script", context.getScript().getName())
        jsonWebResponse.getClaims().setClaim("ua", context.getHttpRequest().getHeader("User-Agent"))
        claims = jsonWebResponse.getClaims()
        claims.setClaim("org_seen", claims.getClaimAsString("org_id"))
        self.calls.append(1)
        jsonWebResponse.getClaims().setClaim("calls", len(self.calls))
        print "a", 1, "b",
        print "c"
        print
        print "# not a comment", "print 'x'"  # print "in a comment"
        return True

    def get(self, jsonArray, context):
        print "Modify ssa response script. Modify get ssa list: %s" % jsonArray.length()
        for i in range(jsonArray.length()):
            ssa = jsonArray.getJSONObject(i).getJSONObject("ssa")
            if ssa.has("org_id"):
                ssa.put("tenant", self.tenant + ":" + ssa.getString("org_id"))
        for item in jsonArray:
            item["seen"] = True
        return True

    def revoke(self, ssaList, context):
        print "Modify ssa response script. Modify revoke ssaList: %s" % ssaList.size()
        for i in range(ssaList.size()):
            ssa = ssaList.get(i)
            print "revoked", ssa.getId(), ssa.getOrgId(), ssa.getState(), ssa.getCreatorId()
        for ssa in ssaList:
            print "attrs", ssa.getAttributes().getSoftwareId(), ssa.getAttributes().isOneTimeUse()
        return True
'''

TOML = 'tenant = "acme-prod"\nregion = "eu"\n'


@pytest.fixture
def janssen_file(tmp_path: Path) -> Path:
    path = tmp_path / "modify_ssa.py"
    path.write_text(JANSSEN)
    (tmp_path / "modify_ssa.toml").write_text(TOML)
    return path


def test_janssen_sample_create_through_the_sandbox(ssa_script, janssen_file):
    script = ssa_script(janssen_file)
    assert script.hooks == ["create", "get", "revoke"]
    result = script.create(claims={"org_id": "acme"}, context={"request": {
        "method": "POST", "path": "/ssa", "headers": {"user-agent": "curl/8"}}})
    assert result["header"]["custom_header_name"] == "custom_header_value"
    claims = result["claims"]
    assert claims["custom_claim_name"] == "custom_claim_value"
    assert claims["tenant"] == "acme-prod"
    assert claims["client"] == "sample-client"
    assert claims["issuer"] == "http://127.0.0.1:8080"
    assert claims["script"] == "modify_ssa"
    assert claims["ua"] == "curl/8"
    assert claims["org_seen"] == "acme"
    logs = result["logs"]
    assert logs[0].startswith("Modify ssa response script. Modify idToken: ")
    assert "a 1 b c" in logs  # the trailing comma: no newline, a space
    assert "" in logs  # a bare print
    assert "# not a comment print 'x'" in logs


def test_self_attributes_set_in_a_call_are_reset_per_call(ssa_script, janssen_file):
    script = ssa_script(janssen_file)
    assert script.create()["claims"]["calls"] == 1
    assert script.create()["claims"]["calls"] == 1  # self.calls as init left it, every call


def test_self_attributes_kept_per_client_with_keep_state(ssa_script, tmp_path):
    (tmp_path / "kept.py").write_text(JANSSEN)
    (tmp_path / "kept.toml").write_text(TOML + '[sandbox]\nkeep_state = "per_client"\n')
    script = ssa_script(tmp_path / "kept.py")
    assert script.create()["claims"]["calls"] == 1
    assert script.create()["claims"]["calls"] == 2
    assert script.create(context={"client_id": "other"})["claims"]["calls"] == 1


def test_janssen_get_and_revoke_objects(ssa_script, janssen_file):
    script = ssa_script(janssen_file)
    got = script.get()
    item = got["ssa_list"][0]
    assert item["ssa"]["tenant"] == "acme-prod:acme" and item["seen"] is True
    revoked = script.revoke()
    assert revoked["logs"][0] == "Modify ssa response script. Modify revoke ssaList: 1"
    assert revoked["logs"][1] == "revoked 4f7c2b3e-0000-4000-8000-000000000001 acme ACTIVE sample-client"
    assert revoked["logs"][2] == "attrs acme-scanner True"


def test_json_array_put_and_list_access(ssa_script, tmp_path):
    path = tmp_path / "arr.py"
    path.write_text(
        "class ModifySsaResponse(ModifySsaResponseType):\n"
        "    def get(self, jsonArray, context):\n"
        "        first = jsonArray[0]\n"
        "        obj = jsonArray.getJSONObject(0)\n"
        "        obj.put('note', obj.getJSONObject('ssa').getString('org_id') + '!')\n"
        "        jsonArray.put({'extra': len(jsonArray), 'has': obj.has('note'), 'n': obj.get('note')})\n"
        "        jsonArray.put(jsonArray.getJSONObject(0))\n"
        "        return True\n")
    result = ssa_script(path).get()
    assert [sorted(i) for i in result["ssa_list"]][1] == ["extra", "has", "n"]
    assert result["ssa_list"][0]["note"] == "acme!"
    assert result["ssa_list"][1] == {"extra": 1, "has": True, "n": "acme!"}
    assert result["ssa_list"][2] == result["ssa_list"][0]


def test_cli_scripts_test_runs_a_janssen_file(janssen_file):
    done = subprocess.run([sys.executable, "-m", "ssa_server", "scripts", "test", str(janssen_file),
                           "--hook", "create"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["claims"]["custom_claim_name"] == "custom_claim_value"
    assert out["header"]["custom_header_name"] == "custom_header_value"
    check = subprocess.run([sys.executable, "-m", "ssa_server", "scripts", "check", str(janssen_file)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["hooks"] == ["create", "get", "revoke"]


# --- recognition and the adapter's edges ---
def test_a_plain_script_is_never_adapted(ssa_script, tmp_path):
    path = tmp_path / "plain.py"
    path.write_text("def create(jwt, context):\n    print 'hi'\n    return True\n")
    with pytest.raises(ScriptRefused, match="line 2: SyntaxError"):
        ssa_script(path)
    other = tmp_path / "other_class.py"
    other.write_text("class Foo(object):\n    def create(self, jwt, context):\n        return True\n")
    with pytest.raises(ScriptRefused):
        ssa_script(other)
    nested = tmp_path / "nested.py"  # not at the top level: not a Janssen file, so a plain script
    nested.write_text("def create(jwt, context):\n    class ModifySsaResponse(object):\n        pass\n"
                      "    return True\n")
    with pytest.raises(ScriptError, match="__build_class__"):
        ssa_script(nested).create()
    quoted = tmp_path / "quoted.py"  # in a string: not a Janssen file either
    quoted.write_text('NOTE = """\nclass ModifySsaResponse(ModifySsaResponseType):\n"""\n'
                      "def create(jwt, context):\n    print 'x'\n")
    with pytest.raises(ScriptRefused, match="line 5: SyntaxError"):
        ssa_script(quoted)


def test_errors_point_at_the_users_lines(ssa_script, tmp_path):
    path = tmp_path / "err.py"
    (tmp_path / "err.toml").write_text(TOML)
    path.write_text(JANSSEN.replace('        print "c"\n', '        print "c"\n        x = 1 / 0\n'))
    script = ssa_script(path)
    with pytest.raises(ScriptError, match="ZeroDivisionError"):
        script.create()
    bad = tmp_path / "bad.py"
    (tmp_path / "bad.toml").write_text(TOML)
    head = "    def getApiVersion(self):\n"
    source = JANSSEN.replace(head, head + "        x = = 1\n")
    bad.write_text(source)
    line = source.splitlines().index("        x = = 1") + 1
    with pytest.raises(ScriptRefused, match=f"line {line}: SyntaxError"):
        ssa_script(bad)


def test_an_inert_import_fails_clearly_only_when_used(ssa_script, tmp_path):
    path = tmp_path / "cdi.py"
    path.write_text("from io.jans.service.cdi.util import CdiUtil\n"
                    "from io.jans.as.server.service import AttributeService\n"
                    "class ModifySsaResponse(ModifySsaResponseType):\n"
                    "    def create(self, jsonWebResponse, context):\n"
                    "        print 'inert: %s' % CdiUtil\n"
                    "        CdiUtil.bean(AttributeService)\n"
                    "        return True\n")
    with pytest.raises(ScriptError, match=r"io\.jans\.service\.cdi\.util\.CdiUtil\.bean\(\) is not avail"):
        ssa_script(path).create()


def test_a_real_import_stays_refused(ssa_script, tmp_path):
    path = tmp_path / "osimp.py"
    path.write_text("import os\nclass ModifySsaResponse(ModifySsaResponseType):\n"
                    "    def create(self, jwt, context):\n        return True\n")
    with pytest.raises(ScriptRefused, match="line 1: top level raised ImportError"):
        ssa_script(path)


def test_unsupported_context_method_is_named(ssa_script, tmp_path):
    path = tmp_path / "unsup.py"
    path.write_text("class ModifySsaResponse(ModifySsaResponseType):\n"
                    "    def create(self, jwt, context):\n"
                    "        context.getAttributeService()\n        return True\n")
    with pytest.raises(ScriptError, match=r"context\.getAttributeService\(\) is not supported"):
        ssa_script(path).create()


def test_init_returning_false_refuses_the_script(ssa_script, tmp_path):
    path = tmp_path / "noinit.py"
    path.write_text("class ModifySsaResponse(ModifySsaResponseType):\n"
                    "    def init(self, customScript, configurationAttributes):\n        return False\n"
                    "    def create(self, jwt, context):\n        return True\n")
    with pytest.raises(ScriptRefused, match="init\\(\\) returned False"):
        ssa_script(path)


def test_old_style_init_with_one_argument(ssa_script, tmp_path):
    path = tmp_path / "oldinit.py"
    path.write_text("class ModifySsaResponse(ModifySsaResponseType):\n"
                    "    def init(self, configurationAttributes):\n"
                    "        self.t = configurationAttributes.get('tenant').getValue2()\n"
                    "        return True\n"
                    "    def create(self, jwt, context):\n"
                    "        jwt.getClaims().setClaim('t', self.t)\n        return True\n")
    (tmp_path / "oldinit.toml").write_text('tenant = 7\n')
    assert ssa_script(path).create()["claims"]["t"] == "7"  # Janssen's values are strings


HOSTILE_JANSSEN = [
    ("dunder_method", "    def __eq__(self, other):\n        return True\n"
                      "    def create(self, jwt, context):\n        return True\n"),
    ("self_class", "    def create(self, jwt, context):\n        jwt.claims['x'] = str(self.__class__)\n"),
    ("getattr_self_world", "    def create(self, jwt, context):\n"
                           "        jwt.claims['x'] = str(getattr(self, '_world'))\n"),
    ("bound_method_self", "    def create(self, jwt, context):\n"
                          "        jwt.claims['x'] = str(self.helper.__self__)\n"
                          "    def helper(self):\n        return 1\n"),
    ("bound_method_func", "    def create(self, jwt, context):\n"
                          "        jwt.claims['x'] = str(self.helper.__func__.__globals__)\n"
                          "    def helper(self):\n        return 1\n"),
    ("array_private", "    def get(self, jsonArray, context):\n        jsonArray._items.append(1)\n"),
    ("object_format", "    def get(self, jsonArray, context):\n"
                      "        jsonArray.put('{0.__class__.__init__.__globals__}'.format(jsonArray))\n"),
    ("object_format_map", "    def get(self, jsonArray, context):\n"
                          "        jsonArray.put('%s' % ('{a._items}'.format_map({'a': jsonArray}),))\n"),
    ("method_attr", "    def get(self, jsonArray, context):\n"
                    "        jsonArray.put(str(jsonArray.length.__self__))\n"),
    ("inert_dunder", "    def create(self, jwt, context):\n"
                     "        jwt.claims['x'] = str(ModifySsaResponseType.__class__)\n"),
    ("inert_getattr", "    def create(self, jwt, context):\n"
                      "        jwt.claims['x'] = str(getattr(ModifySsaResponseType, '_path'))\n"),
    ("inert_setattr", "    def create(self, jwt, context):\n        ModifySsaResponseType.x = 1\n"),
    ("context_client_private", "    def create(self, jwt, context):\n"
                               "        jwt.claims['x'] = str(context.getClient()._client_id)\n"),
    ("config_attr_write", "    def init(self, customScript, configurationAttributes):\n"
                          "        configurationAttributes.get('tenant').value = 'x'\n        return True\n"
                          "    def create(self, jwt, context):\n        return True\n"),
    ("self_private_write", "    def create(self, jwt, context):\n        self._world = {}\n"),
    ("ssa_getter_private", "    def revoke(self, ssaList, context):\n"
                           "        print str(ssaList.get(0)._item)\n"),
    ("print_chevron", "    def create(self, jwt, context):\n        print >>jwt, 'x'\n"),
    ("class_kw_metaclass", None),
]


@pytest.mark.parametrize("name,body", HOSTILE_JANSSEN, ids=[h[0] for h in HOSTILE_JANSSEN])
def test_hostile_janssen_scripts_get_nothing(ssa_script, tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    if body is None:
        path.write_text("class ModifySsaResponse(ModifySsaResponseType, metaclass=type):\n"
                        "    def create(self, jwt, context):\n        return True\n")
    else:
        path.write_text("class ModifySsaResponse(ModifySsaResponseType):\n" + body)
    (tmp_path / f"{name}.toml").write_text(TOML)
    try:
        script = ssa_script(path)
        hook = "get" if "jsonArray" in body else "revoke" if "ssaList" in body else "create"
        result = script.run(hook)
    except (ScriptRefused, ScriptError):
        return  # refused or failed inside its limits
    flat = json.dumps(result)
    for leak in ("<class", "function", "object at 0x", "JanssenSelf", "_world", "builtins"):
        assert leak not in flat, (name, flat)
