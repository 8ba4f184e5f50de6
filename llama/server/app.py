"""An OpenAI-compatible HTTP server with continuous batching, and a chat page.

    python -m llama.server                                  # the bundled demo model
    python -m llama.server --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
    torchrun --nproc_per_node 2 -m llama.server --ckpt_dir llama-2-13b-chat/ ...

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (503
unless serving), GET /metrics (Prometheus) and GET / (a chat page). Rank 0 serves HTTP; every
rank steps the same batch (scheduler.py). What a client may send is limited first
(http_guard.py); each request runs as a server_run.Run; metrics.py counts and logs them.
Needs the server extra: pip install -e ".[server]".
"""

import asyncio
import contextlib
import errno
import hmac
import importlib.util
import os
import signal
import socket
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from llama.cli.flags import EXPECTED_ERRORS, ArgumentParser, in_flag_terms, show_warnings_as_lines
from llama.engine.validation import ArgumentValueError
from llama.server.http_guard import decode_json, default_allowed_hosts, guard, limited_protocol
from llama.server.metrics import CLIENT_GONE, Metrics
from llama.server.openai_api import (
    ApiError,
    envelope,
    new_id,
    now,
    parse_chat,
    parse_completion,
)
from llama.server.run import RETRY_AFTER_S, Run
from llama.server.scheduler import Scheduler
from llama.tokenizers import stop_tokens

PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
DRAIN_S = 5  # on Ctrl-C or SIGTERM, how long running answers may still take
# Prompt tokens a step prefills alongside the decode rows (0: each prompt alone as it joins).
# Measured on the 2-core CPU (docs/PERFORMANCE.md, prefill chunks): riding with the
# decode rows saved no time there (the products of a prefill are bound by arithmetic, not by
# reading the weights), small chunks smooth the streams of the other clients but delay first
# tokens. So 0 by default; chunks are for a steadier stream, and for GPUs (unmeasured).
PREFILL_CHUNK = 0
MAX_BODY_BYTES = 4 * 2 ** 20  # a 4096-token prompt is at most ~64k characters; JSON escapes
                              # write one in up to 12 bytes: 4 MiB leaves room for a history
BODY_TIMEOUT_S = 10.0  # between two parts of a body
HEAD_TIMEOUT_S = 10.0  # for a request's head (request line and headers)
MAX_CONNECTIONS = 256  # beyond this a new connection closes the one idle longest


def create_app(scheduler: Scheduler, tokenizer, model_name: str, max_seq_len: int,
               api_key: Optional[str] = None):
    """The FastAPI application serving `scheduler`'s engine."""
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.responses import (
        FileResponse,
        JSONResponse,
        PlainTextResponse,
        StreamingResponse,
    )
    from starlette.exceptions import HTTPException

    app = FastAPI(title="llama", docs_url=None, redoc_url=None, openapi_url=None)
    created = now()
    metrics = Metrics(lambda: scheduler.load)

    # every answer, unknown routes and our own bugs included, is OpenAI's error object
    @app.exception_handler(HTTPException)
    async def http_error(http: HttpRequest, exc: HTTPException):
        message = {404: f"no route {http.url.path}: the API is under /v1 (see GET /v1/models)",
                   405: f"{http.method} is not allowed on {http.url.path}"}.get(
                       exc.status_code, str(exc.detail))
        return error(ApiError(exc.status_code, message, code=str(exc.status_code)))

    @app.exception_handler(Exception)
    async def server_error(http: HttpRequest, exc: Exception):
        print(f"{http.method} {http.url.path} failed:\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
        return error(ApiError(500, f"the server failed ({type(exc).__name__}); see its log",
                              type="server_error"))

    def error(exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    def check_key(http: HttpRequest) -> None:
        if api_key is None:
            return
        scheme, _, given = http.headers.get("authorization", "").strip().partition(" ")
        # compared in constant time: how long a wrong key takes says nothing about the key
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                  api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send 'Authorization: Bearer KEY' "
                                "(the server's --api_key)", type="authentication_error",
                           code="invalid_api_key")

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health():
        # 503 unless serving: a load balancer or supervisor stops sending, or restarts us
        status = scheduler.status
        body = {"status": status, **scheduler.load}
        if scheduler.failed:
            body["error"] = scheduler.failed
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        try:
            check_key(http)
        except ApiError as exc:
            return error(exc)
        # max_model_len (as vLLM names it): the context a conversation must fit in
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "llama",
                                            "max_model_len": max_seq_len}]}

    async def complete(http: HttpRequest, parse):
        record = metrics.begin(http.url.path)
        try:
            check_key(http)
            body = decode_json(await http.body())
            # tokenizing takes a while for long prompts: not on the loop serving everyone
            job = await asyncio.to_thread(parse, body, tokenizer, max_seq_len, model_name)
            record.id = new_id(job.chat)
            record.prompt_tokens = sum(len(prompt) for prompt in job.prompts)
            run = Run(scheduler, job, metrics, record)
            run.submit()
        except ApiError as exc:
            metrics.finish(record, exc.status)
            return error(exc)
        head = envelope(job, record.id, now(), model_name, chunk=job.stream)
        if job.stream:
            return StreamingResponse(run.stream(head, tokenizer), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            answer = await run.response(head, tokenizer, http)
        except ApiError as exc:
            metrics.finish(record, exc.status)
            return error(exc)
        metrics.finish(record, CLIENT_GONE if run.abandoned else 200)
        return answer

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await complete(http, parse_chat)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await complete(http, parse_completion)

    metrics.routes = {route.path for route in app.routes}
    app.state.metrics = metrics  # for the HTTP guard's refusals (http_guard.guard)
    return app


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


def _built_and_run_on_a_thread(build: Callable[[], Scheduler],
                               on_failed: Callable[[], None]) -> Scheduler:
    """build() a scheduler on a thread of its own, which then runs its loop; returns it once
    built (raising what building raised). So one thread loads and steps the model: OpenMP
    regions started from two threads made libgomp stop its idle threads spinning, and each
    region of a step waited to wake them (docs/PERFORMANCE.md)."""
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
        built["scheduler"].run(on_failed)

    thread = threading.Thread(target=run, name="llama-scheduler", daemon=True)
    thread.start()
    ready.wait()
    if "error" in built:
        raise built["error"]
    scheduler = built["scheduler"]
    scheduler.thread = thread  # joined by scheduler.stop()
    return scheduler


def main(argv=None) -> int:
    parser = ArgumentParser(
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
    parser.add_argument("--quantize", choices=["none", "int8", "int4"],
                        help="weights in 8 or 4 bits, quantized while loading; none keeps the "
                             "checkpoint's precision (the default)")
    parser.add_argument("--group_size", type=int, choices=[32, 64, 128],
                        help="int4 only: input columns sharing a scale (default 32)")
    parser.add_argument("--kv_cache_dtype", choices=["float32", "bfloat16"],
                        help="what the KV cache keeps keys and values in: bfloat16 halves it "
                             "(more requests or longer ones in the same memory, faster long "
                             "decodes on the CPU; each key and value rounded once) (default: "
                             "the activations' dtype)")
    parser.add_argument("--activations", choices=["int8"],
                        help="with --quantize int8 or int4: round the activations to int8 too, in "
                             "blocks of 32 (faster prompts on AVX-512 VNNI CPUs, a coarser "
                             "rounding) (default: int16 per token)")
    parser.add_argument("--api_key", default=os.environ.get("LLAMA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: the "
                             "environment variable LLAMA_API_KEY, which keeps the key out of "
                             "the process list; else no key)")
    parser.add_argument("--max_body_bytes", type=int, default=MAX_BODY_BYTES,
                        help=f"largest request body; larger ones get HTTP 413 (default "
                             f"{MAX_BODY_BYTES})")
    parser.add_argument("--max_connections", type=int, default=MAX_CONNECTIONS,
                        help="open connections at most: a new one beyond closes the one idle "
                             f"longest (default {MAX_CONNECTIONS})")
    parser.add_argument("--timeout", type=float, default=HEAD_TIMEOUT_S,
                        help="seconds a client has to send a request's headers, and between "
                             f"two parts of its body; slower ones are cut (default "
                             f"{HEAD_TIMEOUT_S:g})")
    parser.add_argument("--allowed_hosts",
                        help="comma-separated host names the Host header may carry (default: "
                             "localhost, 127.0.0.1 and ::1 when --host is one of them, so that "
                             "no web page elsewhere can use the server; else any)")
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
    if args.quantize == "none":
        args.quantize = None
    if args.prefill_chunk < 0:
        parser.error(f"--prefill_chunk must be 0 or more, got {args.prefill_chunk}")
    if args.api_key is not None and not args.api_key.strip():
        given = any(a.startswith("--api_key") for a in (sys.argv[1:] if argv is None else argv))
        where = "--api_key" if given else "LLAMA_API_KEY"
        parser.error(f"{where} is empty: give a key, or unset it to serve without one")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        parser.error(f"--max_seq_len must be at least 2 (a prompt token and an answer's), got "
                     f"{args.max_seq_len}")
    if not args.prefix_cache >= 0:
        parser.error(f"--prefix_cache must be 0 (off) or more MiB, got {args.prefix_cache}")
    for flag, low in (("max_batch_size", 1), ("max_queue", 0), ("max_body_bytes", 1),
                      ("max_connections", 1), ("timeout", 0.001)):
        if getattr(args, flag) < low:
            parser.error(f"--{flag} must be at least {low}, got {getattr(args, flag)}")

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        print("error: the server needs FastAPI and uvicorn: pip install -e \".[server]\"",
              file=sys.stderr)
        return 1
    names = [action.dest for action in parser._actions]
    show_warnings_as_lines(names)  # as the scripts show them: one line, in flag terms
    try:
        return _serve(args, parser)
    except EXPECTED_ERRORS as error:  # a person's mistake: one line, no traceback
        print(f"error: {in_flag_terms(str(error), names, getattr(error, 'param', None))}",
              file=sys.stderr, flush=True)
        return 1


def _listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a taken port is said at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = ("another server uses it: stop it, or pass another --port"
                if exc.errno == errno.EADDRINUSE else "check --host and --port")
        raise ArgumentValueError("port", f"cannot listen on {host}:{port} ({exc.strerror}); "
                                         f"{hint}") from None
    return sock


def _serve(args, parser) -> int:
    import torch.distributed
    import uvicorn

    from llama.cli.flags import is_rank0, resolve_model_paths
    from llama.engine.core import Engine
    from llama.engine.distributed import shutdown
    from llama.engine.prefix_cache import PrefixCache
    from llama.generation import Llama

    _Server = _uvicorn_server(uvicorn)

    demo = args.ckpt_dir is None
    ckpt_dir, tokenizer_path = resolve_model_paths(args.ckpt_dir, args.tokenizer_path)
    max_seq_len = args.max_seq_len or (512 if demo else 2048)
    listening = _listening_socket(args.host, args.port) if is_rank0() else None

    def build() -> Scheduler:
        generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, args.max_batch_size,
                                device=args.device, dtype=args.dtype, seed=args.seed,
                                quantize=args.quantize, group_size=args.group_size,
                                reserve_memory=int(args.prefix_cache * 2 ** 20),
                                kv_cache_dtype=args.kv_cache_dtype,
                                activations=args.activations)
        model, tokenizer = generator.model, generator.tokenizer
        # rows of different lengths read only their own cache slots (and faster: README)
        model.use_native_kernels()
        cache = model.new_cache(args.max_batch_size, max_seq_len)
        prefixes = (PrefixCache.with_megabytes(args.prefix_cache, cache)
                    if args.prefix_cache else None)
        engine = Engine(model, stop_tokens(tokenizer), cache, release_finished=True,
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
    serving: Dict[str, Any] = {}

    def scheduler_failed() -> None:  # on the scheduler's thread: nothing can be served now
        if "server" in serving:
            serving["server"].should_exit = True

    scheduler = _built_and_run_on_a_thread(build, scheduler_failed)
    tokenizer = scheduler.tokenizer
    name = args.model_name or ("llama-demo" if demo else Path(ckpt_dir).resolve().name)
    app = create_app(scheduler, tokenizer, name, max_seq_len, args.api_key)
    allowed = (args.allowed_hosts.split(",") if args.allowed_hosts
               else default_allowed_hosts(args.host))
    app = guard(app, args.max_body_bytes, args.timeout, allowed, app.state.metrics)
    print(f"Serving {name} on http://{args.host}:{args.port} (chat page at /, OpenAI API "
          f"under /v1)", file=sys.stderr, flush=True)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                    timeout_graceful_shutdown=DRAIN_S,
                                    # asyncio accepts up to `backlog` connections at a time
                                    # before any beyond the limit is closed: both count
                                    # against the open-files limit
                                    backlog=args.max_connections,
                                    http=limited_protocol(args.max_connections, args.timeout)),
                     scheduler)
    serving["server"] = server
    try:
        if scheduler.failed is None:
            server.run(sockets=[listening])
    finally:
        scheduler.stop()  # cancels what still runs, and stops the other ranks
        shutdown()
    if scheduler.failed is not None:
        print(f"error: the server stopped because its scheduler failed ({scheduler.failed})",
              file=sys.stderr, flush=True)
        return 1
    print("rank 0 stopped", file=sys.stderr, flush=True)
    return 0
