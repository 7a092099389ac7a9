# Issues an SSA only for organisations the registry knows: asks the registry over context.http
# (the server performs the call, to registry_check.toml's [http] allow-list only) with an API key
# from context.secrets (registry_check.toml's [secrets]: the file holds a reference, the server
# reads the value).  An unknown org: 403 and nothing stored; the registry unreachable: the call
# fails and, with on_script_error = "fail", so does the request (502).


def create(jwt, context):
    org = jwt.claims.get("org_id", "")
    answer = context.http.get(context.config["registry_url"] + org,
                              headers={"authorization": "Bearer " + context.secrets["registry_key"]})
    if answer["status"] == 404:
        context.log("refused an SSA for unknown org %s" % org)
        context.deny("access_denied", "organisation %s is not in the registry" % org)
        return False
    if answer["status"] != 200:
        raise ValueError("the registry answered %d" % answer["status"])
    jwt.claims["registry_status"] = answer["json"]["status"]
    return True
