"""The OpenAPI description of the HTTP API (/openapi.json) and a small self-contained page (/docs).

Response schemas come from the same pydantic models the handlers serialise, so they cannot drift.
"""

from __future__ import annotations

import html
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from shared.query import MAX_DEPTH, MAX_TOP_K, Collapse
from tools.queries import MAX_DEAD_LETTERS, UNLIKE_WEIGHT
from tools.schemas import COLLAPSE, SORT_BY, DeadLettersOut, ErrorOut, IndexStatusOut, ItemOut, SearchIn, SearchOutput

_REF = "#/components/schemas/{model}"

_SEARCH_PARAMS: list[dict[str, Any]] = [
    {
        "name": "top_k",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": 10},
        "description": "Results per page.",
    },
    {
        "name": "cursor",
        "in": "query",
        "schema": {"type": "string"},
        "description": f"A previous page's next_cursor, with the same other parameters: the next page. Pages never "
        f"overlap and reach {MAX_DEPTH:,} results deep.",
    },
    {
        "name": "max_drop",
        "in": "query",
        "schema": {"type": "number", "minimum": 0, "maximum": 2},
        "description": "Drop results scoring more than this below the best result (off by default).",
    },
    {
        "name": "collapse",
        "in": "query",
        "schema": {"type": "string", "enum": [c.value for c in Collapse], "default": "hash"},
        "description": COLLAPSE,
    },
    {"name": "sort_by", "in": "query", "schema": {"type": "string"}, "description": SORT_BY},
    {
        "name": "order",
        "in": "query",
        "schema": {"type": "string", "enum": ["asc", "desc"], "default": "desc"},
        "description": "With sort_by.",
    },
    {
        "name": "min_score",
        "in": "query",
        "schema": {"type": "number", "minimum": -1, "maximum": 1},
        "description": "Drop results with a cosine similarity below this.",
    },
    {
        "name": "source",
        "in": "query",
        "schema": {"type": "string"},
        "description": "Only items from this source (folder, kafka).",
    },
    {
        "name": "filter.<key>",
        "in": "query",
        "schema": {"type": "string"},
        "description": "Only items whose metadata <key> equals the value: `filter.category=shoes`. A number, "
        'true, false or null matches that JSON value; quote it ("2021") to match a string.',
    },
]


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Bad argument; the error says which.",
        401: "Missing or wrong bearer token.",
        404: "Unknown item id.",
        413: "Request body over CLIPDEX_MAX_UPLOAD_BYTES.",
        422: "Not an image, or an image over the pixel limit.",
    }
    return {
        str(code): {"description": text[code], "content": {"application/json": {"schema": _ref(ErrorOut)}}}
        for code in codes
    }


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _ok(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"200": {"description": description, "content": {"application/json": {"schema": _ref(model)}}}}


def openapi_spec(version: str, *, token: bool) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (SearchOutput, SearchIn, ItemOut, IndexStatusOut, DeadLettersOut, ErrorOut):
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    item_id = {"name": "item_id", "in": "path", "required": True, "schema": {"type": "string"}}
    paths: dict[str, Any] = {
        "/search": {
            "get": {
                "summary": "Images that match a text description, optionally steered by stored items",
                "parameters": [
                    {"name": "query", "in": "query", "required": True, "schema": {"type": "string", "minLength": 1}},
                    {
                        "name": "like",
                        "in": "query",
                        "schema": {"type": "array", "items": {"type": "string"}},
                        "style": "form",
                        "explode": True,
                        "description": "Item ids whose look to add, weight 1 each (repeatable); left out of results.",
                    },
                    {
                        "name": "unlike",
                        "in": "query",
                        "schema": {"type": "array", "items": {"type": "string"}},
                        "style": "form",
                        "explode": True,
                        "description": f"Texts or item ids to push results away from, weight {UNLIKE_WEIGHT:g} each "
                        "(repeatable). CLIP has no negation: this lowers, it does not filter.",
                    },
                    *_SEARCH_PARAMS,
                ],
                "responses": {**_ok(SearchOutput, "Best matches first."), **_errors(400, 401)},
            },
            "post": {
                "summary": "Weighted terms: texts, stored items, images (base64, path, URL or uploaded); weights "
                "may be negative",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref(SearchIn)},
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "query": {
                                        "type": "string",
                                        "description": 'A SearchIn as JSON; a term {"upload": NAME} is the file '
                                        "part NAME. A file part no term names joins with weight 1.",
                                    },
                                    "file": {"type": "string", "format": "binary"},
                                },
                            }
                        },
                    },
                },
                "responses": {**_ok(SearchOutput, "Best matches first."), **_errors(400, 401, 404, 413, 422)},
            },
        },
        "/similar": {
            "get": {
                "summary": "Images like a stored item (by its stored vector; the item itself is left out)",
                "parameters": [
                    {"name": "id", "in": "query", "required": True, "schema": {"type": "string"}},
                    *_SEARCH_PARAMS,
                ],
                "responses": {**_ok(SearchOutput, "Best matches first."), **_errors(400, 401, 404)},
            },
            "post": {
                "summary": "Images like an uploaded one",
                "parameters": _SEARCH_PARAMS,
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "properties": {"file": {"type": "string", "format": "binary"}},
                                "required": ["file"],
                            }
                        },
                        "image/*": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "responses": {**_ok(SearchOutput, "Best matches first."), **_errors(400, 401, 413, 422)},
            },
        },
        "/items/{item_id}": {
            "get": {
                "summary": "One item: uri, metadata, status",
                "parameters": [item_id],
                "responses": {**_ok(ItemOut, "The item."), **_errors(401, 404)},
            }
        },
        "/items/{item_id}/thumbnail": {
            "get": {
                "summary": "A JPEG thumbnail (at most 256 px) of the item's image",
                "parameters": [item_id],
                "responses": {
                    "200": {"description": "JPEG", "content": {"image/jpeg": {}}},
                    **_errors(401, 404, 422),
                },
            }
        },
        "/status": {
            "get": {
                "summary": "Index status: counts, model, delta, freshness and lag, latest dead letters (as MCP "
                "index_status)",
                "responses": {**_ok(IndexStatusOut, "The status."), **_errors(400, 401)},
            }
        },
        "/dead-letters": {
            "get": {
                "summary": "What could not be indexed, newest first, with reasons (read-only; paths shortened, URL "
                "query strings left out)",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_DEAD_LETTERS, "default": 50},
                        "description": "How many.",
                    }
                ],
                "responses": {**_ok(DeadLettersOut, "Newest first."), **_errors(400, 401)},
            }
        },
        "/health": {
            "get": {
                "summary": "Liveness and index size (no token needed)",
                "responses": {
                    "200": {"description": "{status, items, generation, delta_size}"},
                    "503": {"description": "{status: unavailable, reason}: the store cannot be reached"},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics: search counters and latency histograms, store counts",
                "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {}}}},
            }
        },
        "/": {
            "get": {
                "summary": "The web UI: search, browse, find similar, index health (no token needed to load it; "
                "it asks for one)",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
            }
        },
        "/mcp": {
            "post": {
                "summary": "MCP over streamable HTTP (tools: search, find_similar, get_item, index_status; "
                "resources clipdex://items/{id}, .../thumbnail, .../image)",
                "responses": {"200": {"description": "MCP JSON-RPC"}},
            }
        },
    }
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "clipdex",
            "version": version,
            "description": "Visual search over CLIP embeddings. Errors are JSON objects {error: ...}.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if token:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearer": []}]
    return spec


class Docs:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(self.spec)

    async def page(self, request: Request) -> Response:
        rows = []
        for path, ops in self.spec["paths"].items():
            for method, op in ops.items():
                params = ", ".join(p["name"] for p in op.get("parameters", []))
                rows.append(
                    f"<tr><td><code>{method.upper()} {html.escape(path)}</code></td>"
                    f"<td>{html.escape(op['summary'])}</td><td><code>{html.escape(params)}</code></td></tr>"
                )
        body = (
            "<!doctype html><html><head><meta charset='utf-8'><title>clipdex API</title>"
            "<style>body{font-family:sans-serif;margin:2em}td{padding:.3em 1em;border-bottom:1px solid #ddd}"
            "</style></head><body><h1>clipdex HTTP API</h1>"
            '<p>Errors are JSON <code>{"error": "..."}</code>. The full description is '
            "<a href='/openapi.json'>/openapi.json</a> (OpenAPI 3.1).</p>"
            "<table><tr><th>endpoint</th><th>what</th><th>parameters</th></tr>" + "".join(rows) + "</table>"
            "</body></html>"
        )
        return HTMLResponse(body)
