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
from typing import Any, TypeVar

import anyio.to_thread
from pydantic import ValidationError
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
from shared.query import MAX_IMAGE_TERMS, MAX_TOP_K, Collapse, SearchOptions
from shared.types import Filters, MetaValue
from tools.auth import BodyTooLarge
from tools.metrics import CONTENT_TYPE, Metrics
from tools.queries import UNLIKE_WEIGHT, Queries, TermSpec
from tools.schemas import DeadLetterOut, DeadLettersOut, ItemOut, SearchIn, SearchOutput

logger = logging.getLogger(__name__)

SEARCH_PARAMS = frozenset({"top_k", "min_score", "source", "max_drop", "collapse", "sort_by", "order", "cursor"})
TEXT_TERMS = frozenset({"query", "like", "unlike"})
FILTER_PREFIX = "filter."
DEAD_LETTERS_LIMIT = 50

Handler = Callable[[Request], Awaitable[Response]]
T = TypeVar("T", int, float)

INTERNAL_ERROR = "internal error: the request failed on the server; the server log says why"
BAD_UPLOAD = (
    "the request body is not a valid multipart/form-data upload: send the image in the field 'file' "
    "(curl: -F file=@photo.jpg), or as a raw body with an image/* content type"
)


STORE_RETRY_AFTER_S = 5  # a store failure (a locked or failing disk) may pass: clients are told when to try again


def error_response(status: int, message: str) -> JSONResponse:
    headers = {"Retry-After": str(STORE_RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


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
            Route("/search", self._wrap("/search", self.search_post), methods=["POST"]),
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
        _only(params, TEXT_TERMS | SEARCH_PARAMS)
        if "query" not in params:
            raise InvalidRequest("add the search text as ?query=..., e.g. /search?query=red+bicycle")
        specs = [TermSpec(text=params["query"])]
        specs += [TermSpec(item_id=v) for v in params.getlist("like")]
        specs += [TermSpec(text_or_item=v, weight=UNLIKE_WEIGHT) for v in params.getlist("unlike")]
        result = await self.queries.search(specs, search_args(params), "http")
        return _json(SearchOutput.of(result))

    async def search_post(self, request: Request) -> Response:
        """Weighted terms as JSON, or as multipart: a JSON `query` part and image file parts."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            limit = self.queries.core.settings.max_upload_bytes
            async with request.form(max_files=MAX_IMAGE_TERMS, max_fields=8, max_part_size=limit) as form:
                uploads: dict[str, bytes] = {}
                query_text = None
                for name, part in form.multi_items():
                    if isinstance(part, UploadFile):
                        if name in uploads:
                            raise InvalidRequest(f"two file parts are named {name!r}: name each one differently")
                        uploads[name] = await part.read()
                    elif name == "query":
                        query_text = part
                    else:
                        raise InvalidRequest(f"unknown form field {name!r}: send a JSON part `query` and image files")
            body = _search_body(query_text or '{"terms": []}')
            specs = _term_specs(body, uploads)
        elif content_type.startswith("application/json"):
            body = _search_body(await request.body())
            specs = _term_specs(body, {})
        else:
            raise InvalidRequest(
                'POST /search takes a JSON body ({"terms": [{"text": "a beach"}], "top_k": 10}), or multipart '
                f"form data with a JSON part `query` and image files (got content type {content_type or 'none'!r})"
            )
        result = await self.queries.search(specs, _options(body), "http")
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


def search_args(params: QueryParams) -> SearchOptions:
    """top_k, min_score, max_drop, collapse, sort_by, order, cursor, source and filter.<key> from query
    parameters (their values are checked with the rest of the search: `SearchOptions.check`)."""
    metadata = {
        key[len(FILTER_PREFIX) :]: filter_value(value) for key, value in params.items() if key.startswith(FILTER_PREFIX)
    }
    if "" in metadata:
        raise InvalidRequest("a filter needs a metadata key: filter.<key>=<value>, e.g. filter.category=shoes")
    source = params.get("source") or None
    filters = Filters(metadata=metadata, source=source) if metadata or source else None
    top_k = _number(params, "top_k", int, f"a whole number from 1 to {MAX_TOP_K}")
    return SearchOptions(
        top_k=10 if top_k is None else top_k,
        filters=filters,
        min_score=_number(params, "min_score", float, "a number between -1 and 1"),
        max_drop=_number(params, "max_drop", float, "a number from 0 to 2"),
        collapse=params.get("collapse", "hash"),  # type: ignore[arg-type]  # checked with the options
        sort_by=params.get("sort_by") or None,
        order=params.get("order", "desc"),  # type: ignore[arg-type]
        cursor=params.get("cursor") or None,
    )


def _number(params: QueryParams, name: str, kind: type[T], what: str) -> T | None:
    if name not in params:
        return None
    try:
        return kind(params[name])
    except ValueError:
        raise InvalidRequest(f"{name} must be {what} (got {params[name]!r})") from None


def _search_body(raw: bytes | str) -> SearchIn:
    try:
        return SearchIn.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors(include_input=False)[:5]
        )
        raise InvalidRequest(
            f"the search request is not valid ({problems}); send JSON like "
            '{"terms": [{"text": "a beach", "weight": 1}, {"item_id": "kafka:sku-1", "weight": 0.5}], "top_k": 10}'
        ) from None


def _term_specs(body: SearchIn, uploads: dict[str, bytes]) -> list[TermSpec]:
    """The body's terms; an uploaded file that no term names joins them with weight 1."""
    specs: list[TermSpec] = []
    named: set[str] = set()
    for term in body.terms:
        if term.upload is not None:
            if term.upload not in uploads:
                raise InvalidRequest(f"a term names the upload {term.upload!r}, but no file part has that name")
            named.add(term.upload)
            others = [k for k, v in term.model_dump(exclude={"upload", "weight"}).items() if v is not None]
            if others:
                raise InvalidRequest(f"a term is one thing: upload {term.upload!r} also has {', '.join(others)}")
            specs.append(TermSpec(image=uploads[term.upload], weight=term.weight))
        else:
            specs.append(
                TermSpec(
                    text=term.text,
                    item_id=term.item_id,
                    image_base64=term.image_base64,
                    path=term.path,
                    url=term.url,
                    weight=term.weight,
                )
            )
    specs += [TermSpec(image=data) for name, data in uploads.items() if name not in named]
    return specs


def _options(body: SearchIn) -> SearchOptions:
    return SearchOptions(
        top_k=body.top_k,
        filters=body.filters.to_filters() if body.filters else None,
        min_score=body.min_score,
        max_drop=body.max_drop,
        collapse=Collapse(body.collapse),
        sort_by=body.sort_by,
        order=body.order,
        cursor=body.cursor,
    )


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
