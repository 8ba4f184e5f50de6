"""The request fields beyond plain sampling, read into a Job (openai_api.py): response_format,
tools and tool_choice (with tool messages), n, presence/frequency penalties, logit_bias; and
a chat answer's tool calls, held back from a stream until known."""

from typing import Any, Dict, List, Optional

from llama.constrained.spec import make_constraint, response_format_spec
from llama.constrained.tools import (
    ToolError,
    convert_messages,
    grammar,
    parse_calls,
    parse_tools,
    system_prompt,
)
from llama.engine.penalties import logit_adjust
from llama.engine.validation import ArgumentError
from llama.server.errors import ApiError

MAX_N = 16  # choices per request (each takes a slot like a request of its own)
FIELDS = {"response_format", "presence_penalty", "frequency_penalty", "logit_bias", "n"}
CHAT_FIELDS = FIELDS | {"tools", "tool_choice", "parallel_tool_calls"}


def _api_error(param: str, message: str) -> ApiError:
    return ApiError(400, message, param)


def chat_messages(body: Dict[str, Any]) -> Any:
    """The request's messages in Llama 2's plain roles: tool calls and results written in the
    calling convention (tools.py), and the functions told in the system prompt."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return messages
    try:
        tools = parse_tools(body.get("tools"), body.get("tool_choice"))
        messages = convert_messages(messages)
    except ToolError as error:
        raise _api_error(error.param, str(error)) from None
    if tools is None:
        return messages
    told = system_prompt(tools)
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") == "system" \
            and isinstance(first.get("content"), str):
        return [{"role": "system", "content": f"{first['content']}\n\n{told}"}] + messages[1:]
    return [{"role": "system", "content": told}] + messages


def read_options(job, body: Dict[str, Any], tokenizer) -> None:
    """Set job.spec, job.tools, job.adjust, job.n (prompts, limits and seeds repeated per
    choice); check that every budget holds the shortest answer its grammar allows."""
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N):
        raise _api_error("n", f"'n' must be an integer between 1 and {MAX_N}, got {n!r}")
    try:
        job.adjust = logit_adjust(body.get("presence_penalty"), body.get("frequency_penalty"),
                                  body.get("logit_bias"), tokenizer.n_words)
        job.spec = response_format_spec(body.get("response_format"))
    except ArgumentError as error:
        raise _api_error(error.param, str(error)) from None
    if job.chat:
        try:
            job.tools = parse_tools(body.get("tools"), body.get("tool_choice"))
        except ToolError as error:
            raise _api_error(error.param, str(error)) from None
        if job.tools is not None:
            parallel = body.get("parallel_tool_calls")
            if parallel is not None and not isinstance(parallel, bool):
                raise _api_error("parallel_tool_calls", "'parallel_tool_calls' must be true or "
                                                        f"false, got {parallel!r}")
            job.tools.parallel = parallel is not False
            if job.spec is not None:
                raise _api_error("response_format", "'response_format' cannot be combined "
                                                    "with 'tools' here: leave one out")
            job.spec = grammar(job.tools)
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
    """One choice's answer when tools were offered: text streams as it comes, unless it turns
    out to be a call (its first non-space character is "{"), which is held until complete."""

    def __init__(self):
        self.text = ""
        self.held = True

    def add(self, piece: str) -> str:
        """The text to send now for a new piece."""
        self.text += piece
        if not self.held:
            return piece
        stripped = self.text.lstrip()
        if not stripped or stripped.startswith("{"):
            return ""
        self.held = False
        return self.text

    def calls(self) -> Optional[List[Dict[str, Any]]]:
        """The answer's tool_calls, once complete (None for a text answer)."""
        return parse_calls(self.text) if self.held else None

    def rest(self) -> str:
        """Text still held at the end of a text answer (all whitespace)."""
        return self.text if self.held and self.calls() is None else ""
