# Janssen's sample "Modify SSA Response" script, ported: adds a header and a claim to every new
# SSA.  Unlike Janssen, ssa-server signs after the script ran, so the claim is signed too.


def create(jwt, context):
    jwt.getHeader().setClaim("custom_header_name", "custom_header_value")
    jwt.getClaims().setClaim("custom_claim_name", "custom_claim_value")
    return True


def get(ssa_list, context):
    return True


def revoke(ssa_list, context):
    return True
