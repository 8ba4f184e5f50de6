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

from llama.distributed import broadcast_object, is_main_process
from llama.engine import Engine, Sequence
from llama.sampling import RowNoise
from llama.text import TextTracker


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


@dataclass
class _Work:
    """One iteration's decisions, the same on every rank."""
    admit: List[Tuple] = field(default_factory=list)  # (id, prompt, limit, temperature, ...)
    cancel: List[int] = field(default_factory=list)
    stop: bool = False


class Scheduler:
    def __init__(self, engine: Engine, tokenizer, max_queue: int = 64,
                 heartbeat_s: float = 5.0):
        self.engine, self.tokenizer = engine, tokenizer
        self.max_queue, self.heartbeat_s = max_queue, heartbeat_s
        self.lock = threading.Condition()
        self.waiting: Deque[Request] = deque()
        self.requests: Dict[int, Request] = {}  # rank 0: admitted, by id
        self.running: Dict[int, Tuple[Sequence, int]] = {}  # id -> (sequence, tokens sent)
        self.to_cancel: List[int] = []
        self.stopping = False
        self.draining_until: Optional[float] = None  # see drain()
        self.on_drained: Optional[Callable[[], None]] = None
        self.failing: Dict[int, str] = {}  # cancelled ids whose clients get an error
        self.next_id = 0
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0}
        self.thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ rank 0, any thread
    def submit(self, request: Request) -> Request:
        """Queue a request; raises QueueFull when max_queue requests are already waiting."""
        with self.lock:
            if self.stopping or self.draining_until is not None:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting for a slot")
            request.id, self.next_id = self.next_id, self.next_id + 1
            if request.seed is None:  # drawn here so that every rank uses the same
                request.seed = random.getrandbits(63)
            self.waiting.append(request)
            self.lock.notify()
        return request

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
    def load(self) -> Dict[str, int]:
        prefixes = self.engine.prefix_cache
        with self.lock:
            return {"running": len(self.running), "waiting": len(self.waiting),
                    "slots": len(self.engine.slots), **self.counts,
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
    def run(self) -> None:
        """Rank 0's loop: decide, broadcast, apply, step, report."""
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
                work.admit.append((request.id, request.prompt, request.limit,
                                   request.temperature, request.top_p, request.stop,
                                   request.logprobs, request.top_logprobs, request.seed))
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
        for (request_id, prompt, limit, temperature, top_p, stop, logprobs, top_logprobs,
             seed) in work.admit:
            sequence = Sequence(prompt=prompt, limit=limit, temperature=temperature,
                                top_p=top_p, logprobs=logprobs, top_logprobs=top_logprobs,
                                text=TextTracker(self.tokenizer, stop),
                                noise=RowNoise(seed, vocab, self.engine.device))
            try:
                self.engine.add(sequence)
            except Exception as error:  # e.g. out of memory: this request fails, not others
                self.engine.release(sequence)
                self._report_error(request_id, error)
                continue
            self.running[request_id] = (sequence, 0)

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
    def _report(self, request_id: int, sequence: Sequence, sent: int) -> int:
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
