"""An OpenAI-compatible HTTP server with continuous batching, and a chat page.

    python -m llama.server                                  # the bundled demo model
    python -m llama.server --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
    torchrun --nproc_per_node 2 -m llama.server --ckpt_dir llama-2-13b-chat/ ...

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, and
GET / (a chat page). Rank 0 serves HTTP; every rank steps the same batch (scheduler.py).
Needs the server extra: pip install -e ".[server]".
"""

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

from llama import cpu_kernels
from llama.chat_format import UNSAFE_ERROR
from llama.openai_api import (
    ApiError,
    Job,
    chat_logprobs,
    completion_logprobs,
    envelope,
    new_id,
    now,
    parse_chat,
    parse_completion,
    usage,
)
from llama.scheduler import Event, QueueFull, Request, Scheduler, ShuttingDown

PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
RETRY_AFTER_S = 1
DRAIN_S = 5  # on Ctrl-C or SIGTERM, how long running answers may still take
DISCONNECT_CHECK_S = 0.5  # how often a non-streaming request looks for its client
# Prompt tokens a step prefills alongside the decode rows (0: each prompt alone as it joins).
# Measured on the 2-core CPU (README, "Throughput with concurrent clients"): riding with the
# decode rows saved no time there (the products of a prefill are bound by arithmetic, not by
# reading the weights), small chunks smooth the streams of the other clients but delay first
# tokens. So 0 by default; chunks are for a steadier stream, and for GPUs (unmeasured).
PREFILL_CHUNK = 0


def create_app(scheduler: Scheduler, tokenizer, model_name: str, max_seq_len: int,
               api_key: Optional[str] = None):
    """The FastAPI application serving `scheduler`'s engine."""
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

    app = FastAPI(title="llama", docs_url=None, redoc_url=None, openapi_url=None)
    created = now()

    def error(exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    def check_key(http: HttpRequest) -> None:
        if api_key is not None and http.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(401, "a valid API key is needed: send 'Authorization: Bearer KEY' "
                                "(the server's --api_key)", type="authentication_error",
                           code="invalid_api_key")

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", **scheduler.load}

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        try:
            check_key(http)
        except ApiError as exc:
            return error(exc)
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "llama"}]}

    async def complete(http: HttpRequest, parse):
        try:
            check_key(http)
            try:
                body = await http.json()
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
                raise ApiError(400, f"the body is not valid JSON ({exc})") from None
            job = parse(body, tokenizer, max_seq_len, model_name)
            run = Run(scheduler, job)
            run.submit()
        except ApiError as exc:
            return error(exc)
        head = envelope(job, new_id(job.chat), now(), model_name, chunk=job.stream)
        if job.stream:
            return StreamingResponse(run.stream(head, tokenizer), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return await run.response(head, tokenizer, http)
        except ApiError as exc:
            return error(exc)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await complete(http, parse_chat)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await complete(http, parse_completion)

    return app


class Run:
    """One HTTP request's choices on the scheduler: events arrive from its thread into an
    asyncio queue of this request's event loop."""

    def __init__(self, scheduler: Scheduler, job: Job):
        self.scheduler, self.job = scheduler, job
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.requests: List[Request] = []

    def submit(self) -> None:
        if self.job.refused:
            return
        job = self.job
        try:
            for index, (prompt, limit) in enumerate(zip(job.prompts, job.limits)):
                request = Request(prompt=prompt, limit=limit, temperature=job.temperature,
                                  top_p=job.top_p, stop=job.stop,
                                  logprobs=job.logprobs, top_logprobs=job.top_logprobs,
                                  seed=job.seed,
                                  on_event=self._receiver(index))
                self.requests.append(self.scheduler.submit(request))
        except QueueFull as exc:
            self.cancel()
            raise ApiError(429, f"the server is busy ({exc}); retry after {RETRY_AFTER_S} s",
                           type="rate_limit_error", code="rate_limit_exceeded") from None
        except ShuttingDown as exc:
            self.cancel()
            raise ApiError(503, str(exc), type="server_error") from None

    def _receiver(self, index: int):
        def receive(event: Event) -> None:  # on the scheduler's thread
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (index, event))
            except RuntimeError:  # the loop is closed (shutting down): nobody is listening,
                pass              # and the scheduler's thread must live on to stop cleanly
        return receive

    def cancel(self) -> None:
        for request in self.requests:
            self.scheduler.cancel(request)

    async def events_until_done(self, http=None) -> AsyncIterator:
        """(choice index, event) until every choice is done; a client that disconnects
        (non-streaming: checked every DISCONNECT_CHECK_S, while events arrive too) cancels
        what is left."""
        remaining = len(self.requests)
        checked = time.monotonic()
        while remaining:
            if http is not None and time.monotonic() - checked >= DISCONNECT_CHECK_S:
                checked = time.monotonic()
                if await http.is_disconnected():
                    self.cancel()
                    return
            try:
                index, event = await asyncio.wait_for(self.events.get(),
                                                      timeout=DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                continue
            if event.done:
                remaining -= 1
                if event.finish_reason == "error":
                    self.cancel()
                    if event.shutdown:
                        raise ApiError(503, event.error, type="server_error")
                    raise ApiError(500, f"generation failed: {event.error}",
                                   type="server_error")
            yield index, event

    async def response(self, head: Dict[str, Any], tokenizer, http) -> Dict[str, Any]:
        job = self.job
        if job.refused:
            return _refusal(head)
        n = len(job.prompts)
        texts, tokens, logprobs, top = [""] * n, [[] for _ in range(n)], \
            [[] for _ in range(n)], [[] for _ in range(n)]
        finish, prompt_tokens, completion_tokens = [None] * n, 0, 0
        async for index, event in self.events_until_done(http):
            texts[index] += event.text
            tokens[index] += event.tokens
            logprobs[index] += event.logprobs
            top[index] += event.top
            if event.done:
                finish[index] = event.finish_reason
                prompt_tokens += event.prompt_tokens
                completion_tokens += event.completion_tokens
        choices = []
        for i in range(n):
            choice: Dict[str, Any] = {"index": i, "finish_reason": finish[i], "logprobs": None}
            if job.chat:
                choice["message"] = {"role": "assistant", "content": texts[i], "refusal": None}
                if job.logprobs:
                    choice["logprobs"] = chat_logprobs(tokenizer, tokens[i], logprobs[i], top[i])
            else:
                prefix = job.texts[i] if job.echo else ""
                choice["text"] = prefix + texts[i]
                if job.logprobs:
                    choice["logprobs"] = completion_logprobs(tokenizer, tokens[i], logprobs[i],
                                                             top[i], len(prefix))
            choices.append(choice)
        return {**head, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    async def stream(self, head: Dict[str, Any], tokenizer) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text, a last chunk with finish_reason,
        usage if asked for, then [DONE]. The same id and created in every chunk."""
        job = self.job
        extra = {"usage": None} if job.include_usage else {}
        prompt_tokens = completion_tokens = 0
        try:
            if job.chat:  # the first chunk carries the role
                yield _sse({**head, **extra, "choices": [_chat_choice(0, {"role": "assistant",
                                                                          "content": ""})]})
            if job.refused:
                yield _sse({**head, **extra, "choices": [_chat_choice(0, {"content": _REFUSAL})]})
                yield _sse({**head, **extra, "choices": [_chat_choice(0, {}, "stop")]})
            elif job.echo:
                for i, text in enumerate(job.texts):
                    yield _sse({**head, **extra, "choices": [_text_choice(i, text)]})
            async for index, event in self.events_until_done():
                if event.text or event.tokens:
                    if job.chat:
                        piece = _chat_choice(index, {"content": event.text})
                        if job.logprobs:
                            piece["logprobs"] = chat_logprobs(tokenizer, event.tokens,
                                                              event.logprobs, event.top)
                    else:
                        piece = _text_choice(index, event.text)
                        if job.logprobs:
                            piece["logprobs"] = completion_logprobs(
                                tokenizer, event.tokens, event.logprobs, event.top, 0)
                    yield _sse({**head, **extra, "choices": [piece]})
                if event.done:
                    prompt_tokens += event.prompt_tokens
                    completion_tokens += event.completion_tokens
                    last = (_chat_choice(index, {}, event.finish_reason) if job.chat else
                            _text_choice(index, "", event.finish_reason))
                    yield _sse({**head, **extra, "choices": [last]})
            if job.include_usage:
                yield _sse({**head, "choices": [],
                            "usage": usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"
        except ApiError as exc:
            yield _sse(exc.body())
        finally:  # the client went away (or we are done): free the slots
            self.cancel()


_REFUSAL = UNSAFE_ERROR  # the reference's answer to a dialog with the format's special tags


def _sse(payload: Dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _chat_choice(index: int, delta: Dict[str, Any], finish_reason: Optional[str] = None):
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _text_choice(index: int, text: str, finish_reason: Optional[str] = None):
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def _refusal(head: Dict[str, Any]) -> Dict[str, Any]:
    message = {"role": "assistant", "content": _REFUSAL, "refusal": None}
    return {**head, "choices": [{"index": 0, "message": message, "logprobs": None,
                                 "finish_reason": "stop"}], "usage": usage(0, 0)}


def _uvicorn_server(uvicorn):
    class Server(uvicorn.Server):
        """uvicorn's server, stopped our way: the first Ctrl-C or SIGTERM stops taking
        requests and lets running answers finish (up to DRAIN_S seconds, then they end with
        an error) before the server closes; a second one ends them at once."""

        def __init__(self, config, scheduler: Scheduler):
            super().__init__(config)
            self.scheduler = scheduler

        @contextlib.contextmanager
        def capture_signals(self):
            def handle(sig, frame):
                if self.scheduler.draining:
                    self.force_exit = True
                self.scheduler.drain(DRAIN_S, on_drained=self._drained)

            handlers = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT,
                                                                     signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)

        def _drained(self) -> None:  # on the scheduler's thread
            self.should_exit = True

    return Server


def _built_and_run_on_a_thread(build: Callable[[], Scheduler]) -> Scheduler:
    """build() a scheduler on a thread of its own, which then runs its loop; returns it once
    built (raising what building raised). So one thread loads and steps the model: OpenMP
    regions started from two threads made libgomp stop its idle threads spinning, and each
    region of a step waited ~40 us to wake them (S, batch 1: 24 ms a step against 20)."""
    built: dict = {}
    ready = threading.Event()

    def run() -> None:
        try:
            built["scheduler"] = build()
        except BaseException as error:  # raised again on the main thread
            built["error"] = error
            return
        finally:
            ready.set()
        built["scheduler"].run()

    thread = threading.Thread(target=run, name="llama-scheduler", daemon=True)
    thread.start()
    ready.wait()
    if "error" in built:
        raise built["error"]
    scheduler = built["scheduler"]
    scheduler.thread = thread  # joined by scheduler.stop()
    return scheduler


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama.server", description="Serve a Llama 2 checkpoint over HTTP with "
        "OpenAI's API (chat completions, completions, models) and a chat page at /.")
    parser.add_argument("--ckpt_dir", help="checkpoint directory (default: the bundled demo "
                                           "model)")
    parser.add_argument("--tokenizer_path", help="tokenizer.model (default: the one in or "
                                                 "beside --ckpt_dir)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                                                            "127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max_batch_size", type=int, default=4,
                        help="requests decoded together: the KV cache's slots (default 4)")
    parser.add_argument("--max_seq_len", type=int, default=None,
                        help="tokens per request, prompt and answer (default 2048; 512 for "
                             "the demo model)")
    parser.add_argument("--max_queue", type=int, default=64,
                        help="requests that may wait for a slot; more get HTTP 429 "
                             "(default 64)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on "
                                        "GPUs, float32 on the CPU)")
    parser.add_argument("--quantize", choices=["int8", "int4"],
                        help="weights in 8 or 4 bits, quantized while loading (default: the "
                             "checkpoint's precision)")
    parser.add_argument("--group_size", type=int, choices=[32, 64, 128],
                        help="int4 only: input columns sharing a scale (default 32)")
    parser.add_argument("--api_key", default=os.environ.get("LLAMA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $LLAMA_API_KEY, "
                             "else no key)")
    parser.add_argument("--model_name", help="the model's id in the API (default: the "
                                             "checkpoint directory's name)")
    parser.add_argument("--seed", type=int, default=1, help="seed for requests without one")
    parser.add_argument("--prefill_chunk", type=int, default=PREFILL_CHUNK,
                        help="prompt tokens prefilled per step, riding with the decode rows "
                             "(longer prompts take several steps: other clients' streams "
                             "never stall for a long prefill); 0: each prompt prefilled alone "
                             f"as it joins, the batch waiting (default {PREFILL_CHUNK})")
    parser.add_argument("--prefix_cache", type=float, default=0, metavar="MIB",
                        help="MiB (per process) of prompts' keys and values kept for requests "
                             "that begin the same way, as a chat's next turn does: those "
                             "prefill only what is new (least recently used blocks go first; "
                             "hits and misses in /health). 0: off (default 0)")
    args = parser.parse_args(argv)
    if args.prefill_chunk < 0:
        parser.error(f"--prefill_chunk must be 0 or more, got {args.prefill_chunk}")
    if not args.prefix_cache >= 0:
        parser.error(f"--prefix_cache must be 0 (off) or more MiB, got {args.prefix_cache}")

    from llama.cli import is_rank0, resolve_model_paths
    from llama.distributed import shutdown
    from llama.engine import Engine
    from llama.generation import Llama
    from llama.prefix_cache import PrefixCache

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        print("error: the server needs FastAPI and uvicorn: pip install -e \".[server]\"",
              file=sys.stderr)
        return 1
    import torch.distributed
    import uvicorn

    _Server = _uvicorn_server(uvicorn)

    demo = args.ckpt_dir is None
    ckpt_dir, tokenizer_path = resolve_model_paths(args.ckpt_dir, args.tokenizer_path)
    max_seq_len = args.max_seq_len or (512 if demo else 2048)

    def build() -> Scheduler:
        generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, args.max_batch_size,
                                device=args.device, dtype=args.dtype, seed=args.seed,
                                quantize=args.quantize, group_size=args.group_size)
        model, tokenizer = generator.model, generator.tokenizer
        # rows of different lengths read only their own cache slots (and faster: README)
        cpu_kernels.use_native_kernels(model)
        cache = model.new_cache(args.max_batch_size, max_seq_len)
        prefixes = (PrefixCache.with_megabytes(args.prefix_cache, cache)
                    if args.prefix_cache else None)
        engine = Engine(model, tokenizer.eos_id, cache, release_finished=True,
                        prefill_chunk=args.prefill_chunk, prefix_cache=prefixes)
        return Scheduler(engine, tokenizer, max_queue=args.max_queue)

    if not is_rank0():
        scheduler = build()
        # Ctrl-C reaches every process of the group, and torchrun passes SIGTERM on: rank 0
        # decides when to stop, finishing or cancelling what runs, then tells this rank.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        rank = torch.distributed.get_rank()
        scheduler.follow()
        shutdown()
        print(f"rank {rank} stopped", file=sys.stderr, flush=True)
        return 0
    scheduler = _built_and_run_on_a_thread(build)
    tokenizer = scheduler.tokenizer
    name = args.model_name or ("llama-demo" if demo else Path(ckpt_dir).resolve().name)
    app = create_app(scheduler, tokenizer, name, max_seq_len, args.api_key)
    print(f"Serving {name} on http://{args.host}:{args.port} (chat page at /, OpenAI API "
          f"under /v1)", file=sys.stderr, flush=True)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                    timeout_graceful_shutdown=DRAIN_S), scheduler)
    try:
        server.run()
    finally:
        scheduler.stop()  # cancels what still runs, and stops the other ranks
        shutdown()
    print("rank 0 stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
