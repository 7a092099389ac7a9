"""/openapi.json documents exactly the app's routes."""

from ssa_server.routes import ROUTES


def test_openapi_matches_routes(api):
    doc = api.client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    served = {(r.path, m) for r in ROUTES for m in r.methods if m != "HEAD"}
    assert documented == served
