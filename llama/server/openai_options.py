"""The request fields beyond plain sampling, read into a Job (openai_api.py): response_format,
tools and tool_choice, n, presence/frequency penalties, logit_bias; and a chat answer's tool
calls, streamed as OpenAI streams them."""

from typing import Any, Dict, List, Optional

from llama.constrained.call_stream import new_call_id
from llama.constrained.calling import CallScanner, ToolError, grammar, parse_tools, shape
from llama.constrained.spec import make_constraint, response_format_spec
from llama.engine.penalties import logit_adjust
from llama.errors import ArgumentError
from llama.server.errors import ApiError

MAX_N = 16  # choices per request (each takes a slot like a request of its own)
FIELDS = {"response_format", "presence_penalty", "frequency_penalty", "logit_bias", "n"}
CHAT_FIELDS = FIELDS | {"tools", "tool_choice", "parallel_tool_calls"}


def _api_error(param: str, message: str) -> ApiError:
    return ApiError(400, message, param)


def read_tools(body: Dict[str, Any]):
    """The request's tools.Tools (None when no function may be called)."""
    try:
        tools = parse_tools(body.get("tools"), body.get("tool_choice"))
    except ToolError as error:
        raise _api_error(error.param, str(error)) from None
    if tools is not None:
        parallel = body.get("parallel_tool_calls")
        if parallel is not None and not isinstance(parallel, bool):
            raise _api_error("parallel_tool_calls", "'parallel_tool_calls' must be true or "
                                                    f"false, got {parallel!r}")
        tools.parallel = parallel is not False
    return tools


def read_options(job, body: Dict[str, Any], tokenizer) -> None:
    """Set job.spec (job.tools' grammar, or response_format's), job.adjust, job.n (prompts,
    limits and seeds repeated per choice); check that every budget holds the shortest answer
    its grammar allows."""
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N):
        raise _api_error("n", f"'n' must be an integer between 1 and {MAX_N}, got {n!r}")
    try:
        job.adjust = logit_adjust(body.get("presence_penalty"), body.get("frequency_penalty"),
                                  body.get("logit_bias"), tokenizer.n_words)
        job.spec = response_format_spec(body.get("response_format"))
    except ArgumentError as error:
        raise _api_error(error.param, str(error)) from None
    if job.tools is not None:
        if job.spec is not None:
            raise _api_error("response_format", "'response_format' cannot be combined "
                                                "with 'tools' here: leave one out")
        job.spec = grammar(tokenizer, job.tools)
    if job.spec is not None and job.stop:
        raise _api_error("stop", "'stop' cannot be combined with 'response_format' or "
                                 "'tools' (a stop string could cut the answer before it is "
                                 "complete)")
    if job.spec is not None and not job.refused:
        budget = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        for limit in set(job.limits):
            try:
                make_constraint(tokenizer, tokenizer.n_words, job.spec, limit,
                                param="tools" if job.tools else "response_format",
                                budget_param=budget)
            except ArgumentError as error:
                raise _api_error(error.param, str(error)) from None
    n = n or 1
    job.seeds = [None if job.seed is None else job.seed + j
                 for _ in job.prompts for j in range(n)]
    job.prompts = [prompt for prompt in job.prompts for _ in range(n)]
    job.limits = [limit for limit in job.limits for _ in range(n)]
    job.texts = [text for text in job.texts for _ in range(n)]


class ToolAnswer:
    """One choice's answer when tools were offered, as stream deltas: text streams as it
    comes, unless it turns out to be a call (the family's call format: calling.shape), whose
    deltas follow OpenAI's: the first of each call carries its index, id, type, name and ""
    arguments, the next ones pieces of the arguments as the model writes them."""

    def __init__(self, tokenizer):
        self.scanner = CallScanner(shape(tokenizer))
        self.text = ""  # held while it cannot be told from a call (spaces)
        self.is_call: Optional[bool] = None

    def add(self, piece: str) -> List[Dict[str, Any]]:
        """The deltas to send now for a new piece of the answer."""
        if self.is_call is False:
            return [{"content": piece}] if piece else []
        deltas = self.scanner.feed(piece)
        self.is_call = self.scanner.starts_a_call()
        if self.is_call is None:
            self.text += piece
            return []
        if self.is_call is False:
            text, self.text = self.text + piece, ""
            return [{"content": text}]
        return [{"tool_calls": [_call_delta(delta)]} for delta in deltas]

    def rest(self) -> str:
        """Text still held at the end of an answer (spaces only)."""
        return self.text if self.is_call is None else ""


def _call_delta(delta) -> Dict[str, Any]:
    if delta.name is None:
        return {"index": delta.index, "function": {"arguments": delta.arguments}}
    return {"index": delta.index, "id": new_call_id(), "type": "function",
            "function": {"name": delta.name, "arguments": delta.arguments}}
