# Refuses to issue SSAs for the organisations listed in deny_orgs.toml: POST /ssa answers
# 403 with the error below and nothing is stored.


def create(jwt, context):
    org = jwt.claims.get("org_id", "")
    if org in context.config.get("denied_orgs", []):
        context.log("refused an SSA for org %s" % org)
        context.deny("access_denied", "SSAs for organisation %s are not issued here" % org)
        return False
    return True
