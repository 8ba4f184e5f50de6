"""One HTTP request's run on the scheduler: its choices submitted together, their events
carried from the scheduler's thread to the request's event loop, and written out as OpenAI's
response object or its server-sent events. Counts what it sends in the server's metrics."""

import asyncio
import json
import time
from typing import Any, AsyncIterator, Dict, List, Optional

from llama.chat_format import UNSAFE_ERROR
from llama.constrained.calling import parse_calls
from llama.server.metrics import CLIENT_GONE, Metrics, Record
from llama.server.openai_api import ApiError, Job, chat_logprobs, completion_logprobs, usage
from llama.server.openai_options import ToolAnswer
from llama.server.scheduler import Event, QueueFull, Request, Scheduler, ShuttingDown

RETRY_AFTER_S = 1
DISCONNECT_CHECK_S = 0.5  # how often a non-streaming request looks for its client


class Run:
    """One HTTP request's choices on the scheduler: events arrive from its thread into an
    asyncio queue of this request's event loop."""

    def __init__(self, scheduler: Scheduler, job: Job, metrics: Optional[Metrics] = None,
                 record: Optional[Record] = None):
        self.scheduler, self.job = scheduler, job
        self.metrics, self.record = metrics, record
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.requests: List[Request] = []
        self.abandoned = False  # the client left before the end

    def submit(self) -> None:
        if self.job.refused:
            return
        job = self.job
        try:
            self.requests = self.scheduler.submit_all([
                Request(prompt=prompt, limit=limit, temperature=job.temperature,
                        top_p=job.top_p, stop=job.stop, logprobs=job.logprobs,
                        top_logprobs=job.top_logprobs,
                        seed=job.seeds[index] if job.seeds else job.seed,
                        spec=job.spec, adjust=job.adjust,
                        # a completion continues its prompt: its text keeps the leading
                        # space (OpenAI's clients append it to the prompt)
                        after=[] if job.chat else prompt[-1:],
                        on_event=self._receiver(index))
                for index, (prompt, limit) in enumerate(zip(job.prompts, job.limits))])
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
                    self.abandoned = True
                    self.cancel()
                    return
            try:
                index, event = await asyncio.wait_for(self.events.get(),
                                                      timeout=DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                continue
            if self.metrics is not None:
                self.metrics.tokens(self.record, index, len(event.tokens))
                self.record.completion_tokens += event.completion_tokens
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
                calls = parse_calls(tokenizer, texts[i]) if job.tools is not None else None
                if calls:  # the answer is a call (in the family's tool format)
                    choice["message"].update(content=None, tool_calls=calls)
                    choice["finish_reason"] = "tool_calls"
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
        answers = {}  # with tools: each choice's answer (ToolAnswer)
        status = CLIENT_GONE  # unless it gets to the end
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
                if job.tools is not None:  # text, or a call streamed as OpenAI's deltas
                    answer = answers.setdefault(index, ToolAnswer(tokenizer))
                    deltas = answer.add(event.text)
                    if event.done and answer.rest():
                        deltas.append({"content": answer.rest()})
                    for delta in deltas:
                        piece = _chat_choice(index, delta)
                        if job.logprobs and "content" in delta:
                            piece["logprobs"] = chat_logprobs(tokenizer, event.tokens,
                                                              event.logprobs, event.top)
                        yield _sse({**head, **extra, "choices": [piece]})
                elif event.text or event.tokens:
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
                    finish_reason = event.finish_reason
                    if index in answers and answers[index].is_call:
                        finish_reason = "tool_calls"
                    last = (_chat_choice(index, {}, finish_reason) if job.chat else
                            _text_choice(index, "", finish_reason))
                    yield _sse({**head, **extra, "choices": [last]})
            if job.include_usage:
                yield _sse({**head, "choices": [],
                            "usage": usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"
            status = 200
        except ApiError as exc:
            status = exc.status
            yield _sse(exc.body())
        finally:  # the client went away (or we are done): free the slots
            self.cancel()
            if self.metrics is not None:
                self.metrics.finish(self.record, status)


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
