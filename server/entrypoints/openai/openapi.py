"""The OpenAPI schema (GET /openapi.json) describes the request bodies too.

The endpoints parse their bodies themselves (`input_processor.parse_body`: one
place for the 400s on malformed JSON, lone surrogates, huge integers, deep
nesting), so FastAPI cannot see the schemas; `body_of` declares them and
`install` adds their definitions to the document's components. Schema fuzzing
(tests/test_fuzz.py) works from this document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

_COMPONENTS: dict[str, Any] = {}
_REF = "#/components/schemas/{model}"


def _register(model: type[BaseModel]) -> dict:
    schema = model.model_json_schema(ref_template=_REF)
    for name, d in schema.pop("$defs", {}).items():
        _COMPONENTS.setdefault(name, d)
    _COMPONENTS.setdefault(model.__name__, schema)
    return {"$ref": _REF.format(model=model.__name__)}


def body_of(*models: type[BaseModel]) -> dict:
    """`openapi_extra` of a route whose JSON body is one of `models`."""
    refs = [_register(m) for m in models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def install(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for name, d in _COMPONENTS.items():
                schemas.setdefault(name, d)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
