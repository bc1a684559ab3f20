"""The HTTP API (FastAPI): OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, and
``/health`` (the scheduler's counters: slots in use, queue, prefix cache, tokens).

Errors have OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for bad parameters, malformed
JSON or a prompt over the limit (code ``context_length_exceeded``), 401 for a missing/wrong API key, 404 for an
unknown model or path, 429 when the queue is full, 503 when the model thread is gone, 504 after the request
timeout. Streaming answers are server-sent events (``data: {json}`` ... ``data: [DONE]``); an error after the
stream has started is sent as one ``data: {"error": ...}`` event.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Dict, List, Literal, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import ChatTemplate, StopTextStream
from .scheduler import Engine, EngineClosed, QueueFull, SamplingParams

__all__ = ["create_app", "APIError"]

log = logging.getLogger("fastxlstm.serve")


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


_STATUS_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error"}


def _status_error(status: int, message: str) -> APIError:
    return APIError(status, message, _STATUS_TYPE.get(status, "server_error" if status >= 500 else
                                                       "invalid_request_error"))


# ----------------------------------------------------------------------------------------------------------
# request schemas
# ----------------------------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: Optional[float] = Field(1.0, ge=0, le=2)
    top_p: Optional[float] = Field(1.0, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1, description="extension: -1, 0 or null = off")
    n: Optional[int] = Field(1, ge=1)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = Field(0.0, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(0.0, ge=-2, le=2)
    user: Optional[str] = None
    return_token_ids: Optional[bool] = Field(False, description="extension: also return the generated token ids")


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, List[TextPart]]] = None
    name: Optional[str] = None


class ChatRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None


# ----------------------------------------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------------------------------------

def create_app(engine: Engine, tokenizer, model_name: str, *, chat_template: Optional[ChatTemplate] = None,
               eos_token_ids: Optional[List[int]] = None, max_tokens: int = 2048, max_prompt_tokens: int = 8192,
               api_key: Optional[str] = None, default_max_tokens: Optional[int] = None) -> FastAPI:
    """The ASGI app around a started-or-not :class:`Engine` (it is started and stopped with the app's lifespan).

    tokenizer: a fastxlstm tokenizer (``encode``, ``stream_decoder``); eos_token_ids: ids that end a reply
    (finish_reason "stop"); max_tokens: the most new tokens a request may ask for (also the chat default);
    max_prompt_tokens: longer prompts get a 400; api_key: when set, ``Authorization: Bearer KEY`` is required on
    /v1/*.
    """
    import contextlib

    template = chat_template or ChatTemplate()
    eos = tuple(int(i) for i in (eos_token_ids or ()))
    default_chat_max = default_max_tokens or max_tokens

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="fastxlstm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            msg = next(e for e in errs if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
            return APIError(400, f"the request body is not valid JSON: {msg}".rstrip(": "),
                            code="invalid_json").response()
        parts = []
        param = None
        for e in errs[:5]:
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            where = ".".join(loc) or "body"
            param = param or where
            parts.append(f"{where}: {e.get('msg')}")
        return APIError(400, "invalid request: " + "; ".join(parts), param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            msg = f"no such endpoint: {request.method} {request.url.path}"
        return _status_error(exc.status_code, msg).response()

    async def auth(request: Request):
        # a route dependency, not an HTTP middleware (which would relay every streamed chunk through a queue)
        if api_key is not None:
            import hmac
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                               "authentication_error", code="invalid_api_key")

    v1 = [Depends(auth)]

    # ---------------------------------------------------------------------------------------------------

    def check_common(req: _Sampling):
        if req.model != model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if (req.n or 1) != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if req.presence_penalty or req.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported (use 0)",
                           param="presence_penalty" if req.presence_penalty else "frequency_penalty")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise APIError(400, "stop must be a non-empty string or a list of at most 16 non-empty strings",
                           param="stop")
        return stops

    def params(req: _Sampling, max_new: int) -> SamplingParams:
        if max_new > max_tokens:
            raise APIError(400, f"max_tokens is {max_new}, above this server's limit of {max_tokens}",
                           param="max_tokens")
        top_k = req.top_k if (req.top_k is not None and req.top_k > 0) else None
        top_p = req.top_p if (req.top_p is not None and req.top_p < 1) else None
        temperature = 1.0 if req.temperature is None else float(req.temperature)
        return SamplingParams(max_tokens=max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=req.seed, eos_token_ids=eos)

    def check_prompt(ids: List[int]) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, above this server's limit of "
                                f"{max_prompt_tokens}", param="prompt", code="context_length_exceeded")
        V = engine.backend.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise APIError(400, f"prompt token ids must lie in [0, {V}), got {bad[0]}", param="prompt")

    def submit(ids, sp, prefix_len=None):
        try:
            return engine.submit(ids, sp, prefix_len)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="rate_limit_exceeded") from None
        except EngineClosed as e:
            raise APIError(503, str(e), "server_error") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def usage(n_prompt, n_out):
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    async def watch_disconnect(request: Request, handle) -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                handle.abort()
                return

    async def run_to_end(request: Request, handle, text: StopTextStream):
        """Collect a whole reply: (text, finish_reason, generated token ids)."""
        watcher = asyncio.create_task(watch_disconnect(request, handle))
        ids, finish = [], None
        try:
            async for kind, val in handle:
                if kind in ("token", "eos"):
                    ids.append(val)
                    if kind == "token" and text.push(val)[1]:
                        finish = "stop"
                        break
                elif kind == "finish":
                    finish = val
                    text.finish()
                elif kind == "error":
                    raise _status_error(*val)
        finally:
            watcher.cancel()
            handle.abort()
        return text.text, finish, ids

    def sse(obj) -> str:
        import json
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream_events(handle, text: StopTextStream, make_chunk, n_prompt: int, include_usage: bool,
                            head: Optional[dict] = None, with_ids: bool = False):
        """Server-sent events of one reply; with_ids: each chunk also carries the token ids consumed since the
        previous chunk (so their concatenation is the whole reply's ids)."""
        n, finish, pending = 0, None, []

        def chunk(piece, fin):
            nonlocal pending
            c = make_chunk(piece, fin)
            if with_ids:
                c["choices"][0]["token_ids"], pending = pending, []
            return sse(c)

        try:
            if head is not None:
                yield sse(head)
            done = False
            while not done:
                events = await handle.next_events()
                if not events:
                    break
                pieces = []
                for kind, val in events:
                    if kind in ("token", "eos"):
                        n += 1
                        pending.append(val)
                        if kind == "token":
                            piece, stopped = text.push(val)
                            pieces.append(piece)
                            if stopped:
                                finish, done = "stop", True
                                break
                    elif kind == "finish":
                        finish, done = val, True
                        pieces.append(text.finish())
                    elif kind == "error":
                        if "".join(pieces):
                            yield chunk("".join(pieces), None)
                        yield sse(_status_error(*val).body())
                        return
                if "".join(pieces):
                    yield chunk("".join(pieces), None)
            yield chunk(None, finish)
            if include_usage:
                yield sse(make_chunk(None, None, usage(n_prompt, n)))
            yield "data: [DONE]\n\n"
        finally:
            handle.abort()  # a client gone mid-stream frees its slot at the model thread's next iteration

    # ---------------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        st = engine.stats()
        return {"status": "ok" if engine.dead is None else "dead", "model": model_name, **st}

    @app.get("/v1/models", dependencies=v1)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "fastxlstm"}]}

    @app.post("/v1/completions", dependencies=v1)
    async def completions(req: CompletionRequest, request: Request):
        stops = check_common(req)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if req.logprobs is not None:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
            elif prompt and isinstance(prompt[0], (str, list)):
                raise APIError(400, "a batch of prompts is not supported: send one prompt per request",
                               param="prompt")
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_prompt(ids)
        sp = params(req, req.max_tokens if req.max_tokens is not None else 16)
        handle = submit(ids, sp)
        text = StopTextStream(tokenizer, stops)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(piece, finish, use=None):
            out = {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                   "choices": [] if use else [{"index": 0, "text": piece or "", "logprobs": None,
                                               "finish_reason": finish}]}
            if use:
                out["usage"] = use
            return out

        if req.stream:
            inc = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(handle, text, chunk, len(ids), inc,
                                                   with_ids=bool(req.return_token_ids)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        out, finish, out_ids = await run_to_end(request, handle, text)
        choice = {"index": 0, "text": out, "logprobs": None, "finish_reason": finish}
        if req.return_token_ids:
            choice["token_ids"] = out_ids
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [choice], "usage": usage(len(ids), len(out_ids))}

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(req: ChatRequest, request: Request):
        stops = check_common(req) + list(template.stop)
        if req.logprobs or req.top_logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                content = "".join(p.text for p in content)
            messages.append({"role": m.role, "content": content or ""})
        try:
            ids, prefix_len = template.encode(tokenizer, messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        check_prompt(ids)
        max_new = req.max_completion_tokens or req.max_tokens or default_chat_max
        sp = params(req, max_new)
        handle = submit(ids, sp, prefix_len)
        text = StopTextStream(tokenizer, stops)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(piece, finish, use=None, role=False):
            delta: Dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if piece is not None:
                delta["content"] = piece
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                   "choices": [] if use else [{"index": 0, "delta": delta, "logprobs": None,
                                               "finish_reason": finish}]}
            if use:
                out["usage"] = use
            return out

        if req.stream:
            inc = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(handle, text, chunk, len(ids), inc, chunk("", None, role=True),
                                                   with_ids=bool(req.return_token_ids)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        out, finish, out_ids = await run_to_end(request, handle, text)
        choice = {"index": 0, "message": {"role": "assistant", "content": out}, "logprobs": None,
                  "finish_reason": finish}
        if req.return_token_ids:
            choice["token_ids"] = out_ids
            choice["prompt_token_ids"] = ids
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [choice], "usage": usage(len(ids), len(out_ids))}

    return app
