# Audit log of revocations: one server log line per revoked SSA, tagged with this script's name.
# Revoke scripts cannot undo a revocation; their failures are only logged.


def revoke(ssa_list, context):
    for item in ssa_list:
        context.log("audit: client %s revoked SSA %s of org %s" % (
            context.client_id, item["ssa"]["jti"], item["ssa"]["org_id"]))
    return True
