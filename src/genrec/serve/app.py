"""``genrec serve RUN_DIR``: the trained recommender over HTTP (FastAPI + uvicorn).

Endpoints (OpenAPI at ``/openapi.json``, interactive docs at ``/docs``):

- ``POST /recommend``: top-k items for a history of item ids or exact titles, in an
  inference mode of the run, optionally excluding the items of the history;
- ``GET /items/{item_id}`` and ``GET /items?q=...``: look items up by id or title text;
- ``GET /health`` (the process answers) and ``GET /ready`` (the model is loaded and warm,
  and the service is not shutting down; with the batching counters).

Every error is ``{"detail": "<what is wrong and what to send instead>"}``: 401 without the
API key, 404 unknown item, 413 body too large, 422 invalid request, 503 with
``Retry-After`` when the queue is full. Requests name items and settings only: the run
and its model are fixed at start-up, and no field is ever read as a file path (unknown
fields are rejected).
"""

import hmac
import json
import logging
import socket
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi import Query as QueryParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag

import genrec
from genrec.serve.batching import MicroBatcher, QueueFull, ShuttingDown
from genrec.serve.config import ServeConfig
from genrec.serve.service import MODES, InputError, Query, RecommendService, load_service

log = logging.getLogger("genrec.serve")

# Seconds a client is told to wait when the service is shutting down.
SHUTDOWN_RETRY_AFTER = 5


class ErrorBody(BaseModel):
    detail: str = Field(description="what is wrong with the request, and what to send instead")
    errors: list[dict] | None = Field(None, description="validation errors, one per invalid field")


class RecommendedItem(BaseModel):
    item_id: int
    title: str
    sid: str = Field(description="the item's Semantic ID tokens, e.g. <a_12><b_3><c_200>")
    score: float = Field(
        description="direct and reasoning modes: the sum of the SID tokens' log-probabilities; agent mode: "
        "minus the rank (the agent's list is an order)"
    )


class RecommendResponse(BaseModel):
    items: list[RecommendedItem] = Field(description="best first; fewer than k when the catalogue runs out")
    history: list[int] = Field(description="the history as item ids, after resolving titles")
    k: int
    mode: str
    exclude_seen: bool
    model: str = Field(description="which model of the run answered (a model stage: sft, rl, agent_sft, ...)")
    rationale: str | None = Field(None, description="reasoning mode: the model's rationale, <think> first")
    transcript: dict | None = Field(
        None, description="agent mode: the turns (reasoning, tool calls, errors), what each call retrieved, the answer"
    )


class Item(BaseModel):
    item_id: int
    title: str
    sid: str
    attributes: dict[str, str] = Field(description="other descriptive fields of the item (brand, categories)")


class ItemSearch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    q: str = Field(min_length=1, max_length=200, description="text the title contains (any case)")
    limit: int = Field(20, ge=1, le=100)


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    model: str
    modes: list[str]
    num_items: int
    batching: dict[str, float | int]


def recommend_request_model(cfg: ServeConfig, modes: list[str], num_items: int) -> type[BaseModel]:
    """The request body of /recommend; its limits come from the config and the run, so the OpenAPI schema has them."""
    # One history entry: an item id or a title. The discriminator validates only the branch of the
    # entry's JSON type, so an error names that branch alone ("history[1].item_id: ...").
    entry = Annotated[
        Annotated[StrictInt, Field(ge=0, le=num_items - 1), Tag("item_id")]
        | Annotated[StrictStr, Field(min_length=1, max_length=500), Tag("title")],
        Discriminator(
            lambda v: "item_id" if type(v) is int else "title" if isinstance(v, str) else None,
            custom_error_type="history_entry",
            custom_error_message="a history entry must be an item id (integer) or an exact title (string)",
        ),
    ]

    class RecommendRequest(BaseModel):
        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={"examples": [{"history": [12, 7, "An exact item title"], "k": 10}]},
        )

        history: list[entry] = Field(
            min_length=1,
            max_length=cfg.max_history_items,
            description="the user's items, oldest first: item ids (integers) or exact titles (strings, any case)",
        )
        k: StrictInt = Field(10, ge=1, le=cfg.max_k, description="how many items to return")
        mode: Literal[tuple(modes)] = Field(  # type: ignore[valid-type]
            "direct", description="inference mode: " + "; ".join(f"{m}: {MODES[m]}" for m in modes)
        )
        exclude_seen: StrictBool = Field(True, description="leave out the items of the history")

    return RecommendRequest


def _describe(errors: list[dict]) -> str:
    parts = []
    for err in errors:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.get("loc", ()) if p != "body")
        where = where.lstrip(".") or "body"
        got = repr(err.get("input"))
        parts.append(f"{where}: {err.get('msg')}" + (f" (got {got[:80]})" if "input" in err else ""))
    return "; ".join(parts)


def _error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse request bodies above ``max_bytes`` with 413, before the app reads them.

    The body is read here, up to the limit, and replayed to the app, so a chunked upload
    without Content-Length is cut off as early as a declared one.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _error(400, "Content-Length must be a non-negative integer")(scope, receive, send)
            if int(declared) > self.max_bytes:
                return await self._too_large(int(declared), scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(size, scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, size: int, scope, receive, send):
        detail = f"the request body has {size}+ bytes; the limit is {self.max_bytes} (serve.max_body_bytes)"
        await _error(413, detail, {"Connection": "close"})(scope, receive, send)


def create_app(service: RecommendService, cfg: ServeConfig) -> FastAPI:
    """The FastAPI app over a loaded service; the batcher starts and stops with the app's lifespan."""
    batcher = MicroBatcher(
        service.decode, cfg.max_batch_size, cfg.max_wait_ms / 1000, cfg.arrival_gap_ms / 1000, cfg.max_queue
    )
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        await batcher.run_in_worker(service.warm_up)
        state["ready"] = True
        log.info("serving %s model: %d items, modes %s", service.model_name, len(service.catalogue), service.modes)
        yield
        state["ready"] = False
        await batcher.close(cfg.shutdown_timeout_s)

    app = FastAPI(
        title="genrec",
        version=genrec.__version__,
        description="Generative recommendation over Semantic IDs: a trained genrec run over HTTP.",
        lifespan=lifespan,
    )
    app.state.batcher, app.state.service = batcher, service
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = json.loads(json.dumps(exc.errors(), default=str))  # inputs and contexts as plain JSON
        return JSONResponse({"detail": _describe(errors), "errors": errors}, status_code=422)

    @app.exception_handler(InputError)
    async def unknown_input(request: Request, exc: InputError):
        return _error(422, str(exc))

    errors = {422: {"model": ErrorBody, "description": "invalid request; `detail` says what to change"}}
    auth = []
    if cfg.api_key:
        key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the service's API key")

        async def require_key(key: Annotated[str | None, Depends(key_header)]) -> None:
            if not key or not hmac.compare_digest(key.encode(), cfg.api_key.encode()):
                raise HTTPException(401, "missing or wrong X-API-Key header", headers={"WWW-Authenticate": "ApiKey"})

        auth = [Depends(require_key)]
        errors[401] = {"model": ErrorBody, "description": "missing or wrong X-API-Key header"}

    RecommendRequest = recommend_request_model(cfg, service.modes, len(service.catalogue))

    @app.post(
        "/recommend",
        response_model=RecommendResponse,
        dependencies=auth,
        responses={
            **errors,
            400: {"model": ErrorBody, "description": "the body cannot be decoded (not UTF-8 JSON)"},
            413: {"model": ErrorBody, "description": "request body over serve.max_body_bytes"},
            503: {
                "model": ErrorBody,
                "description": "overloaded or shutting down; retry after Retry-After seconds",
                "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
            },
        },
    )
    async def recommend(body: RecommendRequest) -> RecommendResponse:
        """The top-k items for a history, by constrained beam search; concurrent requests are batched."""
        history = service.catalogue.resolve(body.history)
        try:
            answer = await batcher.submit(Query(tuple(history), body.k, body.exclude_seen, body.mode))
        except QueueFull as exc:
            return _error(503, str(exc), {"Retry-After": str(exc.retry_after)})
        except ShuttingDown as exc:
            return _error(503, str(exc), {"Retry-After": str(SHUTDOWN_RETRY_AFTER)})
        cat = service.catalogue
        return RecommendResponse(
            items=[RecommendedItem(item_id=i, title=cat.titles[i], sid=cat.sids[i], score=s) for i, s in answer.items],
            history=history,
            k=body.k,
            mode=body.mode,
            exclude_seen=body.exclude_seen,
            model=service.model_name,
            rationale=answer.rationale,
            transcript=answer.transcript,
        )

    @app.get(
        "/items/{item_id}",
        response_model=Item,
        dependencies=auth,
        responses={**errors, 404: {"model": ErrorBody, "description": "no such item"}},
    )
    async def get_item(item_id: Annotated[int, PathParam(ge=0)]) -> Item:
        """One item by id."""
        try:
            return Item(**service.catalogue.item(item_id))
        except KeyError as exc:
            raise HTTPException(404, exc.args[0]) from None

    @app.get("/items", response_model=list[Item], dependencies=auth, responses=errors)
    async def search_items(params: Annotated[ItemSearch, QueryParam()]) -> list[Item]:
        """Items whose title contains ``q``, in item id order."""
        return [Item(**item) for item in service.catalogue.search(params.q, params.limit)]

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @app.get("/ready", response_model=Ready, responses={503: {"model": ErrorBody, "description": "not ready"}})
    async def ready():
        """Readiness: the model is loaded and warmed up, and the service is not shutting down."""
        if not state["ready"]:
            return _error(
                503,
                "not ready: the model is loading or the service is shutting down",
                {"Retry-After": str(SHUTDOWN_RETRY_AFTER)},
            )
        return Ready(
            status="ready",
            model=service.model_name,
            modes=service.modes,
            num_items=len(service.catalogue),
            batching=batcher.stats(),
        )

    return app


def uvicorn_config(app: FastAPI, cfg: ServeConfig, **kwargs):
    import uvicorn

    return uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        timeout_graceful_shutdown=cfg.shutdown_timeout_s,
        **kwargs,
    )


def serve(run_dir: str | Path, cfg: ServeConfig) -> None:
    """Load the run's model and serve it until SIGINT/SIGTERM (then finish requests in flight)."""
    import uvicorn

    service = load_service(run_dir, cfg.model, cfg.device, cfg.num_beams, cfg.max_think_tokens)
    app = create_app(service, cfg)
    print(
        f"genrec: serving {run_dir} ({service.model_name} model) on http://{cfg.host}:{cfg.port}  docs: /docs"
        + ("  (X-API-Key required)" if cfg.api_key else "")
    )
    uvicorn.Server(uvicorn_config(app, cfg)).run()


class ServerThread:
    """The app served by uvicorn in a background thread on loopback (tests and the benchmark).

    ``with ServerThread(app, cfg) as url:`` binds 127.0.0.1 on a free port; ``stop()`` asks for
    the same graceful shutdown as SIGTERM does.
    """

    def __init__(self, app: FastAPI, cfg: ServeConfig):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(app, cfg, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 60.0) -> str:
        self.thread.start()
        waited = 0.0
        while not self.server.started:
            if not self.thread.is_alive() or waited > timeout:
                raise RuntimeError("the test server did not start (see the log above)")
            self.thread.join(0.02)
            waited += 0.02
        return self.url

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
