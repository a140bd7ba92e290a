"""FastAPI front end: OpenAI-shaped /v1/chat/completions, /v1/completions, /v1/models, plus /health, /metrics.

request -> validate -> tokenize -> AsyncLLM.generate (one sub-request per choice) -> JSON or SSE chunks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.exceptions import HTTPException as StarletteHTTPException

from dspark.engine import metrics
from dspark.engine.grammar import GrammarError
from dspark.engine.sampling import SamplingParams
from dspark.server.async_llm import AsyncLLM, EngineDeadError
from dspark.server.auth import load_keys
from dspark.server.middleware import Admission, ApiKeyAuth, BodyLimit, RequestContext
from dspark.server.outputs import RequestOutput
from dspark.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    SamplingFields,
    error_body,
    error_response,
)
from dspark.server.tools import ToolCallParser, ToolError, chat_messages, parse_tool_calls, tool_choice, tool_grammar

log = logging.getLogger("dspark.server")


MAX_STOP_CHARS = 256  # text within this distance of the end is held back while streaming


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    # Union types add their member's name to the location; keep only the request's own field path.
    loc = [x for x in loc if not x[:1].isupper() and "[" not in x and x not in ("str", "int", "list")]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    return f"{param or 'body'}: {err.get('msg', 'invalid value')}", param


def _sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None, max_stops: int) -> SamplingParams:
    stops = req.stop_list()
    if len(stops) > max_stops:
        raise APIError(400, f"at most {max_stops} stop sequences are allowed", "stop")
    if any(not s for s in stops):
        raise APIError(400, "stop sequences must not be empty", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop sequences must be at most {MAX_STOP_CHARS} characters", "stop")
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=req.seed,
        max_tokens=max_tokens,
        stop=stops,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        num_speculative_tokens=0 if req.speculative is False else req.num_speculative_tokens,
        slo_tokens_per_s=req.slo_tokens_per_s,
        deadline_s=req.deadline_s,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias={int(k): float(v) for k, v in (req.logit_bias or {}).items()},  # keys checked by check_common
        min_p=req.min_p or 0.0,
    )


class OpenAIServer:
    def __init__(self, engine: AsyncLLM, settings):
        self.engine = engine
        self.settings = settings
        self.tokenizer = engine.tokenizer
        self.model_name = settings.model_name
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size

    # -- validation -----------------------------------------------------------------------------------------
    def grammar_for(self, req: SamplingFields, tools_lark: str | None = None) -> str | None:
        """The compiled grammar of a structured-output request, or of one whose tool choice forces calls (400
        for one that cannot be used)."""
        rf = req.response_format
        if tools_lark is not None:
            if rf is not None and rf.type != "text":
                raise APIError(400, "response_format cannot be combined with a tool_choice that forces a call",
                               "response_format")
            try:
                return self.engine.grammars.lark(tools_lark, "the tools' parameter schemas")
            except GrammarError as e:
                raise APIError(400, str(e), "tools") from None
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_schema" and rf.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs json_schema", "response_format")
        spec = {"type": rf.type}
        if rf.json_schema is not None:
            spec["json_schema"] = {"schema": rf.json_schema.schema_}
        try:
            return self.engine.grammars.grammar(spec)
        except GrammarError as e:
            raise APIError(400, str(e), "response_format") from None

    def check_common(self, req: SamplingFields) -> None:
        if req.model != self.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", "model", "model_not_found")
        if req.n > self.settings.max_n:
            raise APIError(400, f"n must be at most {self.settings.max_n}", "n")
        if any(not k.strip().isdigit() or int(k) >= self.vocab_size for k in req.logit_bias or {}):
            raise APIError(400, f"logit_bias keys must be token ids in [0, {self.vocab_size})", "logit_bias")
        if any(t < 0 or t >= self.vocab_size for t in req.stop_token_ids or []):
            raise APIError(400, f"stop_token_ids must be in [0, {self.vocab_size})", "stop_token_ids")

    def admit(self, n: int) -> None:
        """Bounded queue: when `n` more sequences would not fit in the waiting queue, answer 429 now."""
        if self.engine.try_reserve(n) is None:
            waiting = self.engine.queue_depth()
            metrics.REJECTED.labels("queue_full").inc()
            retry = max(1, waiting // max(1, self.settings.max_num_seqs))
            raise APIError(429, f"server is at capacity ({waiting} requests waiting); retry after {retry} s",
                           code="queue_full", type="rate_limit_error", headers={"Retry-After": str(retry)})

    def max_tokens_for(self, prompt_len: int, asked: int | None, param: str) -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"prompt is {prompt_len} tokens; this model's context length is "
                                f"{self.max_model_len}", param, "context_length_exceeded")
        if asked is None:
            return room
        if asked > room:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({asked}) exceeds the context length "
                                f"{self.max_model_len}", "max_tokens", "context_length_exceeded")
        return asked

    # -- running ----------------------------------------------------------------------------------------------
    async def run_choices(self, rid: str, prompt_ids: list[int], params: SamplingParams, n: int, base: int = 0
                          ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Merge the streams of n sub-requests (choice index base..base+n-1)."""
        if n == 1:  # one stream: read it directly (no task and queue between it and the response per token)
            async with aclosing(self.engine.generate(f"{rid}-{base}", prompt_ids, params)) as outs:
                async for out in outs:
                    yield base, out
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, p: SamplingParams):
            try:
                async for out in self.engine.generate(f"{rid}-{index}", prompt_ids, p):
                    q.put_nowait((index, out))
            except Exception as e:  # noqa: BLE001 - forwarded to the consumer
                q.put_nowait((index, e))
            finally:
                q.put_nowait((index, None))

        tasks = []
        for i in range(n):
            p = params
            if n > 1:  # each choice samples independently (distinct seeds when one is given)
                p = SamplingParams(**{**params.__dict__, "seed": None if params.seed is None else params.seed + i})
            tasks.append(asyncio.create_task(pump(base + i, p)))
        try:
            left = n
            while left:
                index, item = await q.get()
                if item is None:
                    left -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def token_str(self, tid: int) -> str:
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def chat_logprobs(self, entries: list) -> list[dict]:
        out = []
        for tid, lp, top in entries:
            s = self.token_str(tid)
            out.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": self.token_str(t), "logprob": v,
                                          "bytes": list(self.token_str(t).encode())} for t, v in top]})
        return out

    def completion_logprobs(self, entries: list, offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for tid, lp, top in entries:
            s = self.token_str(tid)
            tokens.append(s)
            lps.append(lp)
            tops.append({self.token_str(t): v for t, v in top} if top else None)
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def create_app(engine: AsyncLLM, settings) -> FastAPI:
    srv = OpenAIServer(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.alive:
            engine.start()
        yield
        await engine.shutdown()

    app = FastAPI(title="dspark", version="0.1.0", lifespan=lifespan)
    app.state.server = srv
    app.state.admission = admission = Admission(settings.drain_retry_after_s)

    endpoints = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics"}

    def rejected(status: str, reason: str | None = None):
        def count(path: str) -> None:  # any path can be rejected: label only known ones (bounded series)
            metrics.REQUESTS.labels(path if path in endpoints else "other", status).inc()
            if reason:
                metrics.REJECTED.labels(reason).inc()
        return count

    # add_middleware puts each new one outside the last: the request meets CORS, context, keys, body limit.
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes, on_reject=rejected("413"))
    keys = load_keys(settings.api_key, settings.api_key_file)
    if keys:
        app.add_middleware(ApiKeyAuth, keys=keys, protect_metrics=settings.protect_metrics,
                           on_reject=rejected("401"))
    app.add_middleware(RequestContext, admission=admission, on_reject=rejected("503", "draining"))
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in settings.cors_origins.split(",")],
                           allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"])

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.REQUESTS.labels(request.url.path, str(exc.status)).inc()
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        metrics.REQUESTS.labels(request.url.path, "400").inc()
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        rid = getattr(request.state, "request_id", "-")
        log.exception("unhandled error (request id %s)", rid)
        metrics.REQUESTS.labels(request.url.path, "500").inc()
        return error_response(500, f"internal error ({type(exc).__name__}); request id {rid}", "server_error",
                              headers={"X-Request-Id": rid})

    @app.get("/health")
    async def health():
        """Liveness: the process and its engine thread are alive (stays 200 while draining)."""
        if not engine.alive:
            return error_response(503, "engine is not running", "server_error")
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Readiness: send this replica new requests (503 once SIGTERM starts the drain)."""
        if not engine.alive:
            return error_response(503, "engine is not running", "server_error")
        if admission.draining:
            return error_response(503, "draining", "server_error",
                                  headers={"Retry-After": str(admission.retry_after_s)})
        return {"status": "ready", "in_flight": admission.in_flight}

    registry = REGISTRY  # the process's own metrics; with several API servers, every API server's merged
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": srv.model_name, "object": "model", "created": 0,
                                            "owned_by": "dspark", "max_model_len": srv.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        srv.check_common(req)
        try:
            choice = tool_choice(req)
        except ToolError as e:
            raise APIError(400, str(e), e.param) from None
        messages, extra = chat_messages(req, native="tools" in (srv.tokenizer.chat_template or ""))
        try:
            prompt_ids = srv.tokenizer.encode_chat(messages, **extra)
        except Exception as e:  # noqa: BLE001 - template errors are the caller's input
            raise APIError(400, f"messages could not be formatted with the chat template: {e}", "messages") from e
        asked = req.max_completion_tokens or req.max_tokens
        max_tokens = srv.max_tokens_for(len(prompt_ids), asked, "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", "top_logprobs")
        params = _sampling_params(req, max_tokens, top, settings.max_stop_sequences)
        params.grammar = srv.grammar_for(req, tool_grammar(req, choice))
        srv.admit(req.n)
        rid = f"chatcmpl-{request.state.request_id}"
        created = int(time.time())
        gen = srv.run_choices(rid, prompt_ids, params, req.n)
        tools = ToolUse(req, choice)
        if req.stream:
            return sse(request, chat_stream(srv, req, rid, created, gen, len(prompt_ids), tools),
                       "/v1/chat/completions")
        results = await collect(request, gen, req.n)
        choices = []
        for i, r in enumerate(results):
            message = {"role": "assistant", "content": r["text"]}
            if tools.parse:
                message["content"], calls = parse_tool_calls(r["text"])
                if calls:
                    message["tool_calls"] = calls
                r["finish_reason"] = tools.finish_reason(r["finish_reason"], bool(calls))
            choices.append({"index": i, "message": message,
                            "logprobs": {"content": srv.chat_logprobs(r["logprobs"])} if req.logprobs else None,
                            "finish_reason": r["finish_reason"]})
        metrics.REQUESTS.labels("/v1/chat/completions", "200").inc()
        return {"id": rid, "object": "chat.completion", "created": created, "model": srv.model_name,
                "choices": choices, "usage": usage(len(prompt_ids), results, req.speculation_stats)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        srv.check_common(req)
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        prompts = normalize_prompts(srv, req.prompt)
        if req.stream and len(prompts) > 1:
            raise APIError(400, "streaming supports a single prompt", "prompt")
        plist, grammar = [], srv.grammar_for(req)
        for ids in prompts:
            max_tokens = srv.max_tokens_for(len(ids), req.max_tokens, "prompt")
            plist.append((ids, _sampling_params(req, max_tokens, req.logprobs, settings.max_stop_sequences)))
            plist[-1][1].grammar = grammar
        srv.admit(req.n * len(plist))
        rid = f"cmpl-{request.state.request_id}"
        created = int(time.time())
        if req.stream:
            ids, params = plist[0]
            gen = srv.run_choices(rid, ids, params, req.n)
            echo = srv.tokenizer.decode(ids) if req.echo else ""
            return sse(request, completion_stream(srv, req, rid, created, gen, len(ids), echo), "/v1/completions")
        results, choices, prompt_tokens = [], [], 0
        per_prompt = await asyncio.gather(*(
            collect(request, srv.run_choices(rid, ids, params, req.n, pi * req.n), req.n, pi * req.n)
            for pi, (ids, params) in enumerate(plist)))
        for pi, ((ids, _), res) in enumerate(zip(plist, per_prompt)):
            prompt_text = srv.tokenizer.decode(ids) if req.echo else ""
            for j, r in enumerate(res):
                lp = srv.completion_logprobs(r["logprobs"], len(prompt_text)) if req.logprobs is not None else None
                choices.append({"index": pi * req.n + j, "text": prompt_text + r["text"], "logprobs": lp,
                                "finish_reason": r["finish_reason"]})
            results += res
            prompt_tokens += len(ids)
        metrics.REQUESTS.labels("/v1/completions", "200").inc()
        return {"id": rid, "object": "text_completion", "created": created, "model": srv.model_name,
                "choices": choices, "usage": usage(prompt_tokens, results, req.speculation_stats)}

    return app


def normalize_prompts(srv: OpenAIServer, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt must not be empty", "prompt")
    out = []
    for p in items:
        ids = srv.tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "prompt must not be empty", "prompt")
        if any(t < 0 or t >= srv.vocab_size for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {srv.vocab_size})", "prompt")
        out.append(ids)
    return out


def usage(prompt_tokens: int, results: list[dict], stats: bool = False) -> dict:
    """OpenAI's usage block; with `speculation_stats`, the response's drafting summed over its choices."""
    completion = sum(r["completion_tokens"] for r in results)
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}
    if stats:
        specs = [r["spec"] for r in results if r.get("spec")]
        rounds = sum(s[0] for s in specs)
        width = max((len(s[1]) for s in specs), default=0)
        drafted, accepted = ([sum(s[k][j] for s in specs if j < len(s[k])) for j in range(width)] for k in (1, 2))
        out["speculation"] = {"rounds": rounds, "draft_tokens": sum(drafted), "accepted_tokens": sum(accepted),
                              "tau": (rounds + sum(accepted)) / rounds if rounds else None,
                              # per draft position: verified, kept, and the rate (vLLM's per-position acceptance)
                              "per_position": [{"draft_tokens": d, "accepted_tokens": a, "acceptance_rate": a / d}
                                               for d, a in zip(drafted, accepted)]}
    return out


class Timing:
    """TTFT / inter-token latency of one response, observed into the Prometheus histograms."""

    def __init__(self):
        self.start = self.last = time.monotonic()
        self.first = True

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.monotonic()
        if self.first:
            metrics.TTFT.observe(now - self.start)
            self.first = False
        else:
            for _ in range(n):
                metrics.ITL.observe((now - self.last) / n)
        self.last = now

    def done(self) -> None:
        metrics.E2E.observe(time.monotonic() - self.start)


async def collect(request: Request, gen: AsyncIterator[tuple[int, RequestOutput]], n: int, base: int = 0
                  ) -> list[dict]:
    """Run a non-streaming request to the end; a client that goes away cancels it (and frees its KV)."""
    results = [{"text": "", "logprobs": [], "finish_reason": None, "completion_tokens": 0} for _ in range(n)]
    timing = Timing()

    async def consume():
        async for index, out in gen:
            r = results[index - base]
            r["text"] += out.text
            r["logprobs"] += out.logprobs
            r["completion_tokens"] = out.completion_tokens
            r["spec"] = out.spec or r.get("spec")
            timing.tokens(len(out.token_ids))
            if out.finished:
                r["finish_reason"] = out.finish_reason

    task = asyncio.create_task(consume())
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if not done and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await gen.aclose()
            raise APIError(499, "client disconnected", code="client_closed_request")
    try:
        task.result()
    except ValueError as e:
        raise APIError(400, str(e)) from e
    except EngineDeadError as e:
        raise APIError(503, f"the engine is not running: {e}", type="server_error", code="engine_dead") from e
    finally:
        await gen.aclose()
    timing.done()
    return results


def sse(request: Request, chunks: AsyncIterator[dict], endpoint: str) -> StreamingResponse:
    async def body():
        status = "200"
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except ValueError as e:
            status = "400"
            yield f"data: {json.dumps(error_body(str(e), 'invalid_request_error'))}\n\n"
        except EngineDeadError as e:
            status = "503"
            yield f"data: {json.dumps(error_body(f'the engine is not running: {e}', 'server_error'))}\n\n"
        except Exception as e:  # noqa: BLE001 - the stream has started; report in-band
            status = "500"
            log.exception("stream failed", extra={"request_id": getattr(request.state, "request_id", "-")})
            yield f"data: {json.dumps(error_body(f'internal error: {e}', 'server_error'))}\n\n"
        finally:
            metrics.REQUESTS.labels(endpoint, status).inc()
            await chunks.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class ChunkMaker:
    """Builds one response's SSE chunks; with stream_options.include_usage every chunk carries `usage`
    (null until the last, choice-less chunk, as OpenAI does; with vLLM's `continuous_usage_stats` the usage so far,
    which tells a client how many tokens each chunk brought)."""

    def __init__(self, srv, req: SamplingFields, rid: str, created: int, obj: str, prompt_tokens: int,
                 tally: list[dict]):
        self.base = {"id": rid, "object": obj, "created": created, "model": srv.model_name}
        opts = req.stream_options
        self.with_usage = bool(opts and opts.include_usage)
        self.continuous = self.with_usage and opts.continuous_usage_stats
        self.stats = req.speculation_stats
        self.prompt_tokens = prompt_tokens
        self.tally = tally  # the choices' running counts, which the stream updates

    def __call__(self, choices: list[dict], usage_: dict | None = None) -> dict:
        c = {**self.base, "choices": choices}
        if self.with_usage:
            c["usage"] = usage(self.prompt_tokens, self.tally, self.stats) if self.continuous and usage_ is None \
                else usage_
        return c

    def usage(self, results: list[dict]) -> dict | None:
        """The final usage chunk, or None when the client did not ask for it."""
        if not self.with_usage:
            return None
        return self([], usage(self.prompt_tokens, results, self.stats))


class ToolUse:
    """How a chat request's tools shape its answer: whether calls are parsed out, and the finish reason."""

    def __init__(self, req: ChatCompletionRequest, choice):
        self.parse = bool(req.tools) and choice != "none"
        self.named = isinstance(choice, NamedToolChoice)

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        # OpenAI: 'tool_calls' when the model chose to call; a forced named call ends with 'stop'
        return "tool_calls" if called and reason == "stop" and not self.named else reason


async def chat_stream(srv, req: ChatCompletionRequest, rid, created, gen, prompt_tokens, tools: ToolUse
                      ) -> AsyncIterator[dict]:
    tally = [{"completion_tokens": 0} for _ in range(req.n)]
    chunk = ChunkMaker(srv, req, rid, created, "chat.completion.chunk", prompt_tokens, tally)
    parsers = [ToolCallParser() if tools.parse else None for _ in range(req.n)]
    timing = Timing()
    for i in range(req.n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    try:
        async for i, out in gen:
            tally[i]["completion_tokens"], tally[i]["spec"] = out.completion_tokens, out.spec or tally[i].get("spec")
            timing.tokens(len(out.token_ids))
            lp = {"content": srv.chat_logprobs(out.logprobs)} if req.logprobs and out.logprobs else None
            parser = parsers[i]
            if parser is None:
                if out.text or lp:
                    yield chunk([{"index": i, "delta": {"content": out.text}, "logprobs": lp, "finish_reason": None}])
            else:
                text, calls = parser.feed(out.text)
                if out.finished:
                    rest, _ = parser.finish()
                    text += rest
                if text or lp:
                    yield chunk([{"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}])
                if calls:
                    yield chunk([{"index": i, "delta": {"tool_calls": calls}, "logprobs": None,
                                  "finish_reason": None}])
            if out.finished:
                reason = out.finish_reason
                if parser is not None:
                    reason = tools.finish_reason(reason, bool(parser.calls))
                yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
    finally:
        await gen.aclose()
    timing.done()
    if (final := chunk.usage(tally)) is not None:
        yield final


async def completion_stream(srv, req: CompletionRequest, rid, created, gen, prompt_tokens,
                            prompt_text: str = "") -> AsyncIterator[dict]:
    tally = [{"completion_tokens": 0} for _ in range(req.n)]
    chunk = ChunkMaker(srv, req, rid, created, "text_completion", prompt_tokens, tally)
    offsets = [0] * req.n
    timing = Timing()
    if req.echo:
        for i in range(req.n):
            yield chunk([{"index": i, "text": prompt_text, "logprobs": None, "finish_reason": None}])
            offsets[i] = len(prompt_text)
    try:
        async for i, out in gen:
            tally[i]["completion_tokens"], tally[i]["spec"] = out.completion_tokens, out.spec or tally[i].get("spec")
            timing.tokens(len(out.token_ids))
            lp = None
            if req.logprobs is not None:
                lp = srv.completion_logprobs(out.logprobs, offsets[i])
            offsets[i] += len(out.text)
            if out.text or out.logprobs or out.finished:
                yield chunk([{"index": i, "text": out.text, "logprobs": lp,
                              "finish_reason": out.finish_reason if out.finished else None}])
    finally:
        await gen.aclose()
    timing.done()
    if (final := chunk.usage(tally)) is not None:
        yield final
