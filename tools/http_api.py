"""The HTTP API for applications: search, similar, items, thumbnails, index status, dead letters, health and
metrics.

Bad input gets a 4xx with `{"error": "..."}` saying what to change; the server keeps serving. The routes
and their parameters are described in `tools.openapi` (served at /openapi.json and /docs).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import anyio.to_thread
from starlette.datastructures import QueryParams, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared.errors import (
    ClipdexError,
    FetchFailed,
    HostNotAllowed,
    ImageRejected,
    InvalidRequest,
    NotFound,
    PathNotAllowed,
    SourceNotFound,
    StoreError,
)
from shared.search import MAX_TOP_K
from shared.types import Filters, MetaValue
from tools.auth import BodyTooLarge
from tools.metrics import CONTENT_TYPE, Metrics
from tools.queries import Queries, SearchArgs
from tools.schemas import DeadLetterOut, DeadLettersOut, ItemOut, SearchOutput

logger = logging.getLogger(__name__)

SEARCH_PARAMS = frozenset({"top_k", "min_score", "source"})
FILTER_PREFIX = "filter."
DEAD_LETTERS_LIMIT = 50

Handler = Callable[[Request], Awaitable[Response]]

INTERNAL_ERROR = "internal error: the request failed on the server; the server log says why"
BAD_UPLOAD = (
    "the request body is not a valid multipart/form-data upload: send the image in the field 'file' "
    "(curl: -F file=@photo.jpg), or as a raw body with an image/* content type"
)


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def status_of(exc: ClipdexError) -> int:
    if isinstance(exc, InvalidRequest):
        return 400
    if isinstance(exc, NotFound | SourceNotFound):
        return 404
    if isinstance(exc, PathNotAllowed | HostNotAllowed):
        return 403
    if isinstance(exc, ImageRejected):
        return 422
    if isinstance(exc, FetchFailed):
        return 502
    if isinstance(exc, StoreError):
        return 503
    return 500


class HttpApi:
    def __init__(self, queries: Queries, metrics: Metrics) -> None:
        self.queries = queries
        self.metrics = metrics

    def routes(self) -> list[Route]:
        return [
            Route("/search", self._wrap("/search", self.search), methods=["GET"]),
            Route("/similar", self._wrap("/similar", self.similar_by_id), methods=["GET"]),
            Route("/similar", self._wrap("/similar", self.similar_by_upload), methods=["POST"]),
            Route("/items/{item_id:path}/thumbnail", self._wrap("/items/thumbnail", self.thumbnail), methods=["GET"]),
            Route("/items/{item_id:path}", self._wrap("/items", self.item), methods=["GET"]),
            Route("/status", self._wrap("/status", self.status), methods=["GET"]),
            Route("/dead-letters", self._wrap("/dead-letters", self.dead_letters), methods=["GET"]),
            Route("/health", self._wrap("/health", self.health), methods=["GET"]),
            Route("/metrics", self._wrap("/metrics", self.prometheus), methods=["GET"]),
        ]

    def _wrap(self, route: str, handler: Handler) -> Handler:
        """Turn errors into JSON 4xx/5xx responses that tell the client what it may know (tools.redaction;
        the log keeps the rest), and count responses by route and status."""

        async def endpoint(request: Request) -> Response:
            where = f"{request.method} {request.url.path}"
            try:
                response = await handler(request)
            except ClipdexError as exc:
                status = status_of(exc)
                message = self.queries.redactor.error(exc)
                if status >= 500:
                    logger.warning("%s failed: %s", where, exc)
                elif message != str(exc):
                    logger.info("%s refused: %s", where, exc)
                response = error_response(status, message)
            except (HTTPException, BodyTooLarge):  # Starlette's and the Gate's own answers
                raise
            except Exception:
                logger.exception("%s failed", where)
                response = error_response(500, INTERNAL_ERROR)
            self.metrics.http_responses.inc(route, str(response.status_code))
            return response

        return endpoint

    # -- search -----------------------------------------------------------------------------------------

    async def search(self, request: Request) -> Response:
        params = request.query_params
        _only(params, {"query"} | SEARCH_PARAMS)
        if "query" not in params:
            raise InvalidRequest("add the search text as ?query=..., e.g. /search?query=red+bicycle")
        result = await self.queries.search_text(params["query"], search_args(params), "http")
        return _json(SearchOutput.of(result))

    async def similar_by_id(self, request: Request) -> Response:
        params = request.query_params
        _only(params, {"id"} | SEARCH_PARAMS)
        if "id" not in params:
            raise InvalidRequest("add the item id as ?id=..., or POST an image (multipart field 'file') to /similar")
        result = await self.queries.similar_to_item(params["id"], search_args(params), "http")
        return _json(SearchOutput.of(result))

    async def similar_by_upload(self, request: Request) -> Response:
        params = request.query_params
        _only(params, SEARCH_PARAMS)
        args = search_args(params)
        data = await _uploaded_image(request)
        result = await self.queries.similar_to_image(data, args, "http")
        return _json(SearchOutput.of(result))

    # -- items ------------------------------------------------------------------------------------------

    async def item(self, request: Request) -> Response:
        return _json(ItemOut.of(await self.queries.item(request.path_params["item_id"], "http")))

    async def thumbnail(self, request: Request) -> Response:
        jpeg = await self.queries.thumbnail(request.path_params["item_id"], "http")
        return Response(jpeg, media_type="image/jpeg", headers={"cache-control": "private, max-age=300"})

    # -- operations -------------------------------------------------------------------------------------

    async def status(self, request: Request) -> Response:
        _only(request.query_params, set(), filters=False)
        return _json(await self.queries.status("http"))

    async def dead_letters(self, request: Request) -> Response:
        params = request.query_params
        _only(params, {"limit"}, filters=False)
        try:
            limit = int(params.get("limit", DEAD_LETTERS_LIMIT))
        except ValueError:
            raise InvalidRequest(f"limit must be a whole number (got {params['limit']!r})") from None
        return _json(
            DeadLettersOut(dead_letters=[DeadLetterOut.of(d) for d in await self.queries.dead_letters(limit, "http")])
        )

    async def health(self, request: Request) -> Response:
        """200 while this process can search; 503 with the reason while its store is unreachable, so a load
        balancer sends queries to the replicas that can answer them."""
        core = self.queries.core
        reason = core.unavailable()
        if reason is not None:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        info = core.vectors.info()
        return JSONResponse(
            {"status": "ok", "items": info.items, "generation": info.generation, "delta_size": info.delta_size}
        )

    async def prometheus(self, request: Request) -> Response:
        core = self.queries.core
        stats = await anyio.to_thread.run_sync(core.catalog.stats)
        return Response(self.metrics.render(stats, core.vectors.state()), media_type=CONTENT_TYPE)


def search_args(params: QueryParams) -> SearchArgs:
    """top_k, min_score, source and filter.<key> from query parameters."""
    top_k = 10
    if "top_k" in params:
        try:
            top_k = int(params["top_k"])
        except ValueError:
            raise InvalidRequest(
                f"top_k must be a whole number from 1 to {MAX_TOP_K} (got {params['top_k']!r})"
            ) from None
    min_score = None
    if "min_score" in params:
        try:
            min_score = float(params["min_score"])
        except ValueError:
            raise InvalidRequest(f"min_score must be a number between -1 and 1 (got {params['min_score']!r})") from None
    metadata = {
        key[len(FILTER_PREFIX) :]: filter_value(value) for key, value in params.items() if key.startswith(FILTER_PREFIX)
    }
    if "" in metadata:
        raise InvalidRequest("a filter needs a metadata key: filter.<key>=<value>, e.g. filter.category=shoes")
    source = params.get("source") or None
    filters = Filters(metadata=metadata, source=source) if metadata or source else None
    return SearchArgs(top_k=top_k, filters=filters, min_score=min_score)


def filter_value(raw: str) -> MetaValue:
    """`filter.k=2021` matches the number 2021, `true`/`false`/`null` those values, `"2021"` (quoted) the
    string "2021", and anything else the string as written."""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return raw


def _only(params: QueryParams, allowed: set[str] | frozenset[str], *, filters: bool = True) -> None:
    unknown = sorted(k for k in params if k not in allowed and not (filters and k.startswith(FILTER_PREFIX)))
    if unknown:
        if not allowed:
            raise InvalidRequest(f"unknown query parameter(s) {', '.join(unknown)}; this endpoint takes none")
        accepted = ", ".join(sorted(allowed)) + (f", {FILTER_PREFIX}<key>" if filters else "")
        raise InvalidRequest(f"unknown query parameter(s) {', '.join(unknown)}; this endpoint takes {accepted}")


async def _uploaded_image(request: Request) -> bytes:
    """The image of a multipart upload (field `file`), or a raw image/* body."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        async with request.form(max_files=1, max_fields=10) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise InvalidRequest("the multipart upload has no file field named 'file' (curl: -F file=@photo.jpg)")
            return await upload.read()
    if content_type.startswith(("image/", "application/octet-stream")):
        return await request.body()
    raise InvalidRequest(
        "POST the image as multipart/form-data in the field 'file' (curl: -F file=@photo.jpg), "
        f"or as a raw body with an image/* content type (got content type {content_type or 'none'!r})"
    )


def _json(model: Any) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (404 for an unknown path, 405, a broken multipart body) as JSON, in our words."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        detail = f"no such endpoint {request.url.path}; see /docs for the API"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}; see /docs for the API"
    elif exc.status_code == 400:  # the multipart parser's own words stay in the log
        logger.info("%s %s: bad request body: %s", request.method, request.url.path, exc.detail)
        detail = BAD_UPLOAD
    else:
        detail = HTTPStatus(exc.status_code).phrase
    return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)
