"""``JSONResponse`` rendered by ``jsonvalues.dumps`` (orjson: the list bodies of GET /ssa are large)."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse as _StarletteJSONResponse

from . import jsonvalues


class JSONResponse(_StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        return jsonvalues.dumps(content)
