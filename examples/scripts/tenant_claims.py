# Adds tenant and environment claims to every new SSA, and shows the tenant in GET /ssa.
# The values come from tenant_claims.toml beside this file (context.config).


def create(jwt, context):
    jwt.claims["tenant"] = context.config.get("tenant", "")
    jwt.claims["environment"] = context.config.get("environment", "production")
    return True


def get(ssa_list, context):
    for item in ssa_list:
        item["ssa"]["tenant"] = context.config.get("tenant", "")
    return True
