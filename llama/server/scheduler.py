"""Continuous batching: requests wait in a bounded queue, join the engine's batch in free slots
between decode steps, and leave it as soon as they finish or are cancelled.

Rank 0 owns the queue and decides each iteration's work: which requests to admit (with their
token ids and sampling settings, seeds included) and which to cancel. Under torchrun it
broadcasts that work, and every rank applies it and steps the same batch, so no rank ever
waits on a request it never received. Results are reported on rank 0 only, through each
request's `on_event` callback, called from the scheduler's thread.
"""

import random
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Tuple

from llama.constrained.spec import make_constraint
from llama.engine.core import Engine, EngineSequence
from llama.engine.distributed import broadcast_object, is_main_process
from llama.engine.penalties import LogitAdjust
from llama.engine.sampling import RowNoise
from llama.engine.text import TextTracker


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full: try again later."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests."""


@dataclass
class Request:
    """What a client asked for. `limit` tokens at most; `stop` strings end the text."""
    prompt: List[int]
    limit: int
    temperature: float = 0.6
    top_p: float = 0.9
    stop: List[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    seed: Optional[int] = None
    spec: Optional[object] = None  # grammar.GrammarSpec the answer must match
    adjust: Optional[LogitAdjust] = None  # penalties and logit bias (a template: per row)
    after: List[int] = field(default_factory=list)  # the text follows these (TextTracker)
    on_event: Callable[["Event"], None] = lambda event: None
    id: int = -1  # set by submit


@dataclass
class Event:
    """Progress of a request: new text (and the tokens behind it) while it runs; `done` with
    the finish reason ("stop", "length", or "error" with `error`) at the end."""
    text: str = ""
    tokens: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    top: List[List[Tuple[int, float]]] = field(default_factory=list)
    done: bool = False
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None
    shutdown: bool = False  # the error is the server stopping, not the request


@dataclass(frozen=True)
class Admission:
    """What every rank needs of a request it admits (a Request without its callback, which
    does not cross processes)."""
    id: int
    prompt: List[int]
    limit: int
    temperature: float
    top_p: float
    stop: List[str]
    logprobs: bool
    top_logprobs: int
    seed: Optional[int]
    spec: Optional[object]
    adjust: Optional[LogitAdjust]
    after: List[int]

    @staticmethod
    def of(request: Request) -> "Admission":
        return Admission(request.id, request.prompt, request.limit, request.temperature,
                         request.top_p, request.stop, request.logprobs, request.top_logprobs,
                         request.seed, request.spec, request.adjust, request.after)


@dataclass
class _Work:
    """One iteration's decisions, the same on every rank."""
    admit: List[Admission] = field(default_factory=list)
    cancel: List[int] = field(default_factory=list)
    stop: bool = False


class Scheduler:
    def __init__(self, engine: Engine, tokenizer, max_queue: int = 64,
                 heartbeat_s: float = 5.0):
        if max_queue < 0:
            raise ValueError(f"max_queue must be 0 or more, got {max_queue}")
        self.engine, self.tokenizer = engine, tokenizer
        self.max_queue, self.heartbeat_s = max_queue, heartbeat_s
        self.lock = threading.Condition()
        self.waiting: Deque[Request] = deque()
        self.requests: Dict[int, Request] = {}  # rank 0: admitted, by id
        self.running: Dict[int, Tuple[EngineSequence, int]] = {}  # id -> (sequence, tokens sent)
        self.to_cancel: List[int] = []
        self.stopping = False
        self.draining_until: Optional[float] = None  # see drain()
        self.on_drained: Optional[Callable[[], None]] = None
        self.failing: Dict[int, str] = {}  # cancelled ids whose clients get an error
        self.next_id = 0
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0}
        self.thread: Optional[threading.Thread] = None
        self.failed: Optional[str] = None  # why the loop died (see run)

    # ------------------------------------------------------------------ rank 0, any thread
    def submit(self, request: Request) -> Request:
        """Queue a request; raises QueueFull when it would find neither a free slot nor one
        of max_queue places to wait in."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: List[Request]) -> List[Request]:
        """Queue requests together (the choices of one HTTP request): all of them, or none
        (QueueFull) when the free slots and max_queue places to wait cannot take them all."""
        with self.lock:
            if self.failed is not None:
                raise ShuttingDown(f"the server's scheduler failed ({self.failed}); it is "
                                   f"stopping")
            if self.stopping or self.draining_until is not None:
                raise ShuttingDown("the server is shutting down")
            # admitted requests hold their slot until _forget, so this never counts a slot
            # twice while a request moves from the queue to the batch
            free = max(len(self.engine.slots) - len(self.requests), 0)
            room = free + self.max_queue - len(self.waiting)
            if len(requests) > room:
                raise QueueFull(f"{len(self.requests)} requests run and {len(self.waiting)} "
                                f"wait for a slot; {len(requests)} more do not fit "
                                f"({len(self.engine.slots)} slots, --max_queue "
                                f"{self.max_queue})")
            for request in requests:
                request.id, self.next_id = self.next_id, self.next_id + 1
                if request.seed is None:  # drawn here so that every rank uses the same
                    request.seed = random.getrandbits(63)
                self.waiting.append(request)
            self.lock.notify()
        return requests

    def cancel(self, request: Request) -> None:
        """Drop a request (its client went away): from the queue, or from the batch at the
        next iteration, freeing its slot. Nothing more is reported for it."""
        with self.lock:
            if request in self.waiting:
                self.waiting.remove(request)
                self.counts["cancelled"] += 1
            elif request.id in self.requests:
                self.to_cancel.append(request.id)
                self.lock.notify()

    @property
    def status(self) -> str:
        """"ok", "draining" (stopping: finishing what runs) or "failed" (see run)."""
        return "failed" if self.failed else "draining" if self.draining else "ok"

    @property
    def load(self) -> Dict[str, int]:
        prefixes, cache = self.engine.prefix_cache, self.engine.cache
        with self.lock:
            return {"running": len(self.running), "waiting": len(self.waiting),
                    "slots": len(self.engine.slots), **self.counts,
                    "kv_cache": {"dtype": str(cache.k[0].dtype).replace("torch.", ""),
                                 "bytes": cache.nbytes},  # per process
                    "prefix_cache": prefixes.stats() if prefixes is not None else None}

    def start(self) -> None:
        """Run the loop in a thread of its own (rank 0; other ranks call follow())."""
        self.thread = threading.Thread(target=self.run, name="llama-scheduler", daemon=True)
        self.thread.start()

    def drain(self, seconds: float, on_drained: Callable[[], None]) -> None:
        """Begin to stop: take no new request, fail those still waiting, let running ones
        finish for up to `seconds`, then end them with an error; call on_drained() (from the
        scheduler's thread) once none runs. Asked again, it ends the running ones now."""
        with self.lock:
            if self.draining_until is None:
                self.draining_until = time.monotonic() + seconds
                self.on_drained = on_drained
            else:
                self.draining_until = time.monotonic()
            self.lock.notify()

    @property
    def draining(self) -> bool:
        return self.draining_until is not None

    def stop(self) -> None:
        """Cancel what runs and waits, tell the other ranks to stop, and end the loop."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()

    # ------------------------------------------------------------------ the loop
    def run(self, on_failed: Optional[Callable[[], None]] = None) -> None:
        """Rank 0's loop: decide, broadcast, apply, step, report. If the loop itself fails
        (a bug: a step's own failures are the requests'), every request waiting or running
        gets an error, new ones are refused, and on_failed() is called: the server cannot
        serve any more and should stop."""
        try:
            self._loop()
        except BaseException as error:
            self._fail_all(error)
            if on_failed is not None:
                on_failed()

    def _fail_all(self, error: BaseException) -> None:
        print(f"the scheduler failed; every request ends with an error:\n"
              f"{traceback.format_exc()}", file=sys.stderr, flush=True)
        message = f"the server's scheduler failed ({type(error).__name__}: {error})"
        with self.lock:
            self.failed = f"{type(error).__name__}: {error}"
            doomed = list(self.waiting) + list(self.requests.values())
            self.waiting.clear()
            self.requests.clear()
            self.running.clear()
            self.counts["failed"] += len(doomed)
        for request in doomed:
            self._notify(request, Event(done=True, finish_reason="error", error=message))

    def _loop(self) -> None:
        while True:
            work = self._decide()
            work = broadcast_object(work)
            self._apply(work)
            if work.stop:
                return
            self._step()

    def follow(self) -> None:
        """Another rank's loop: apply rank 0's work and step the same batch, until told to
        stop."""
        while True:
            work = broadcast_object(None)
            self._apply(work)
            if work.stop:
                return
            self._step()

    def _decide(self) -> _Work:
        with self.lock:
            deadline = time.monotonic() + self.heartbeat_s
            while not (self.waiting or self.to_cancel or self.running or self.stopping
                       or self.on_drained):
                # idle: wake now and then, so the other ranks' broadcast never times out
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.lock.wait(left)
            work = _Work(cancel=self.to_cancel, stop=self.stopping)
            self.to_cancel = []
            if self.draining_until is not None:
                self._drain_step(work)
            if self.stopping:
                work.cancel += list(self.running)
                self.waiting.clear()
            free = self.engine.free_slots - len(set(work.cancel) & set(self.running))
            while self.waiting and free > 0:
                request = self.waiting.popleft()
                self.requests[request.id] = request
                work.admit.append(Admission.of(request))
                free -= 1
        return work

    def _drain_step(self, work: _Work) -> None:
        """While draining (lock held): fail the waiting requests; past the deadline, cancel
        the running ones with an error; once none runs, say so (once)."""
        message = "the server is shutting down"
        while self.waiting:
            self._notify(self.waiting.popleft(), Event(done=True, finish_reason="error",
                                                       error=message, shutdown=True))
        if time.monotonic() >= self.draining_until:
            for request_id in self.running:
                if request_id not in work.cancel:
                    work.cancel.append(request_id)
                    self.failing[request_id] = ("the server stopped before this answer was "
                                                "finished")
        if not self.running and self.on_drained is not None:
            on_drained, self.on_drained = self.on_drained, None
            on_drained()

    def _apply(self, work: _Work) -> None:
        for request_id in work.cancel:
            sequence, _ = self.running.pop(request_id, (None, 0))
            if sequence is not None:
                self.engine.release(sequence)
                self.counts["cancelled"] += 1
            message = self.failing.pop(request_id, None)
            if message is not None:
                self._notify(self.requests.get(request_id),
                             Event(done=True, finish_reason="error", error=message,
                                   shutdown=True))
            self._forget(request_id)
        vocab = self.engine.model.params.vocab_size
        for a in work.admit:
            sequence = EngineSequence(prompt=a.prompt, limit=a.limit, temperature=a.temperature,
                                top_p=a.top_p, logprobs=a.logprobs, top_logprobs=a.top_logprobs,
                                text=TextTracker(self.tokenizer, a.stop, a.after),
                                noise=RowNoise(a.seed, vocab, self.engine.device))
            try:
                # every rank builds its own: the same grammar and tokens give the same masks
                if a.spec is not None:
                    sequence.constraint = make_constraint(self.tokenizer, vocab, a.spec,
                                                          a.limit)
                if a.adjust is not None:
                    sequence.adjust = LogitAdjust(a.adjust.presence_penalty,
                                                  a.adjust.frequency_penalty,
                                                  a.adjust.logit_bias)
                self.engine.add(sequence)
            except Exception as error:  # e.g. out of memory: this request fails, not others
                self.engine.release(sequence)
                self._report_error(a.id, error)
                continue
            self.running[a.id] = (sequence, 0)

    def _step(self) -> None:
        """One engine step: sample, report the new tokens (before the model runs for the
        next ones, so clients see each token a forward pass sooner), then advance."""
        if not self.running:
            return
        try:
            self.engine.sample()
            for request_id, (sequence, sent) in list(self.running.items()):
                sent = self._report(request_id, sequence, sent)
                if sequence.finished:
                    del self.running[request_id]
                    self._forget(request_id)
                    self.counts["finished"] += 1
                else:
                    self.running[request_id] = (sequence, sent)
            self.engine.advance()
        except Exception as error:  # a bug or a device failure: fail what runs, stay up
            for request_id, (sequence, _) in list(self.running.items()):
                self.engine.release(sequence)
                self._report_error(request_id, error)
            self.running.clear()

    # ------------------------------------------------------------------ reporting (rank 0)
    def _report(self, request_id: int, sequence: EngineSequence, sent: int) -> int:
        """Tell the request's client what is new: the text that is safe to show, and the
        tokens behind it (held back with the text: a stop string may still cut them).
        Returns how many of its tokens have been reported."""
        request = self.requests.get(request_id)
        if request is None or not is_main_process():
            return len(sequence.tokens)
        if sequence.finished:
            text = sequence.text.rest()
            end = len(sequence.text.tokens_before_stop())  # none past a stop string
        else:
            text = sequence.text.piece()
            end = len(sequence.tokens) if text else sent
        tokens = sequence.tokens[sent:end]
        if text or tokens:
            request.on_event(Event(text=text, tokens=tokens,
                                   logprobs=sequence.token_logprobs[sent:end],
                                   top=sequence.top[sent:end]))
        if sequence.finished:
            request.on_event(Event(done=True, finish_reason=sequence.finish_reason,
                                   prompt_tokens=len(sequence.prompt),
                                   completion_tokens=len(sequence.tokens)))
        return max(sent, end)

    def _report_error(self, request_id: int, error: Exception) -> None:
        self.counts["failed"] += 1
        print(f"request {request_id} failed:\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        request = self.requests.get(request_id)
        self._forget(request_id)
        if request is not None and is_main_process():
            request.on_event(Event(done=True, finish_reason="error",
                                   error=f"{type(error).__name__}: {error}"))

    def _notify(self, request: Optional[Request], event: Event) -> None:
        if request is not None and is_main_process():
            request.on_event(event)

    def _forget(self, request_id: int) -> None:
        with self.lock:
            self.requests.pop(request_id, None)
