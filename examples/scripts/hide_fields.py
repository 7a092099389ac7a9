# GET /ssa filter: removes the fields listed in hide_fields.toml from every listed SSA
# (for example descriptions that portal users should not see).


def get(ssa_list, context):
    hidden = context.config.get("hidden", ["description"])
    for item in ssa_list:
        for name in hidden:
            if name in item["ssa"]:
                del item["ssa"][name]
    return True
