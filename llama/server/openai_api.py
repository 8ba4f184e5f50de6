"""OpenAI's wire format for chat completions and completions: reading a request body into what
the scheduler runs (every field checked, errors naming it), and writing responses and stream
chunks as the `openai` package's types describe them. No HTTP here (server.py)."""

import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from llama.chat_format import validate_dialog
from llama.chat_formats import dialog_tokens, has_special_tags
from llama.constrained.calling import (
    ToolError,
    tool_dialog,
    tool_dialog_tokens,
    uses_tools,
    validator,
)
from llama.server import openai_options
from llama.server.errors import ApiError

# Fields we accept but that have no effect, and the values that mean "off": any other value
# asks for something this server does not do, and is refused rather than ignored.
NEUTRAL = {"suffix": ("",), "best_of": (1,), "store": (False,),
           "service_tier": ("auto", "default")}
IGNORED = {"user", "metadata", "model"}
COMMON = {"max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options",
          "logprobs"} | openai_options.FIELDS
CHAT_FIELDS = COMMON | openai_options.CHAT_FIELDS | {"messages", "max_completion_tokens",
                                                     "top_logprobs"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo"}
MAX_STOP = 4  # as OpenAI's API
# Longest stop string: holding back text that may become one, and finding one, costs a few
# times its length at each token, on the thread that steps every request.
MAX_STOP_CHARS = 256
# Whitespace runs may tokenize as one token (SentencePiece's remove_extra_whitespaces): a
# prompt's length in characters counts each run once when bounding its tokens from below.
_WHITESPACE_RUN = re.compile(r"\s+")
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 0.6, 0.9  # Llama 2's own (Meta's examples)


@dataclass
class Job:
    """A parsed request: one prompt per choice, and how to run and report it."""
    chat: bool
    prompts: List[List[int]]
    limits: List[int]
    texts: List[str] = field(default_factory=list)  # completions: the prompts (for echo)
    refused: bool = False  # a chat with the format's special tags: answered, not run
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    stop: List[str] = field(default_factory=list)
    seed: Optional[int] = None
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    seeds: List[Optional[int]] = field(default_factory=list)  # per choice (n > 1: seed + j)
    spec: Any = None  # grammar.GrammarSpec the answers must match (response_format, tools)
    tools: Any = None  # tools.Tools offered to the model
    adjust: Any = None  # penalties.LogitAdjust (penalties, logit_bias)


def _number(body, name, low, high, default, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be a number, got {type(value).__name__}", name)
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"'{name}' must be in {bound}, got {value!r}", name)
    return float(value)


def _integer(body, name, low, high=None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {type(value).__name__}", name)
    if value < low or (high is not None and value > high):
        within = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ApiError(400, f"'{name}' must be {within}, got {value}", name)
    return value


def _boolean(body, name) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {value!r}", name)
    return bool(value)


def _utf8(text: str, param: str, name: Optional[str] = None) -> str:
    """`text`, if UTF-8 can write it: JSON's escapes can carry a lone surrogate ("\\ud800"),
    which no tokenizer can read. `name`: what the message calls it (default: 'param')."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{name or repr(param)} holds {text[exc.start:exc.end]!r} at "
                            f"character {exc.start}, half of a UTF-16 surrogate pair: not text",
                       param) from None
    return text


def _common(body: Dict[str, Any], allowed: set, model_name: str) -> Job:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, value in body.items():
        if name in NEUTRAL:
            if value is not None and value not in NEUTRAL[name]:
                raise ApiError(400, f"'{name}' is not supported by this server (only "
                                    f"{NEUTRAL[name][0]!r} or null)", name)
        elif name not in allowed and name not in IGNORED:
            raise ApiError(400, f"unrecognized request argument: '{name}'", name)
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist here; this server runs "
                            f"{model_name!r}", "model", code="model_not_found")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(
            isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} "
                            f"of them, got {body['stop']!r}", "stop")
    for text in stop or []:
        _utf8(text, "stop")
        if len(text) > MAX_STOP_CHARS:
            raise ApiError(400, f"a stop string has {len(text)} characters; this server takes "
                                f"at most {MAX_STOP_CHARS}", "stop")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)
                                or set(options) - {"include_usage"}):
        raise ApiError(400, "'stream_options' takes {\"include_usage\": true|false}, and only "
                            "with 'stream': true", "stream_options")
    return Job(chat=False, prompts=[], limits=[],
               temperature=_number(body, "temperature", 0, 2, DEFAULT_TEMPERATURE),
               top_p=_number(body, "top_p", 0, 1, DEFAULT_TOP_P, low_open=True),
               stop=stop or [], seed=_integer(body, "seed", -(2 ** 63), 2 ** 63 - 1),
               stream=stream, include_usage=bool((options or {}).get("include_usage")))


def _prompt_names(param: str, count: int) -> List[str]:
    """What errors call each of `count` prompts: "the prompt", or "prompt 1", "prompt 2", ...
    (counted from 1, as people count) when a request has several."""
    return [f"the {param}"] if count == 1 else [f"prompt {i + 1}" for i in range(count)]


def _limits(job: Job, body, names: Tuple[str, ...], max_seq_len: int, what: str) -> None:
    max_tokens = None
    for name in names:
        value = _integer(body, name, 1)
        if value is not None:
            max_tokens, asked = value, name
    for prompt, called in zip(job.prompts, _prompt_names(what, len(job.prompts))):
        room = max_seq_len - len(prompt)
        if room < 1:
            raise ApiError(400, f"{called} has {len(prompt)} tokens; this server's context "
                                f"is {max_seq_len} tokens (--max_seq_len), which leaves no "
                                f"room for an answer", what, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise ApiError(400, f"'{asked}' is {max_tokens}, but {called} has {len(prompt)} "
                                f"tokens and the context is {max_seq_len}: at most {room}",
                           asked, code="context_length_exceeded")
        job.limits.append(max_tokens if max_tokens is not None else room)


def check_fits(texts: List[str], tokenizer, max_seq_len: int, what: str,
               name: Optional[str] = None) -> None:
    """Refuse, before tokenizing, text that cannot fit the context: no token holds more than
    the vocabulary's longest piece, so a text needs at least (characters / that) tokens.
    Tokenizing costs time and ~45 bytes a character (a 50 MB prompt stalled the server for
    16 s); the exact count is checked after tokenizing what passes. `what`: the field;
    `name`: what the message calls the text (default "the `what`")."""
    longest = tokenizer.longest_token
    most = max_seq_len * longest
    chars = sum(len(_WHITESPACE_RUN.sub(" ", text)) for text in texts)
    if chars > most:
        raise ApiError(400, f"{name or 'the ' + what} has {chars} characters (whitespace runs "
                            f"counted once), more than this server's context of {max_seq_len} "
                            f"tokens can hold (at most {most}: no token is longer than "
                            f"{longest} characters); shorten it", what,
                       code="context_length_exceeded")


def parse_chat(body, tokenizer, max_seq_len: int, model_name: str) -> Job:
    job = _common(body, CHAT_FIELDS, model_name)
    job.chat = True
    messages = _messages(body.get("messages"))
    job.tools = openai_options.read_tools(body)
    tool_format = job.tools is not None or uses_tools(messages)
    try:  # tool calls and results, and the functions, in the family's tool format
        dialog = tool_dialog(tokenizer, messages, job.tools) if tool_format else messages
    except ToolError as error:
        raise ApiError(400, str(error), error.param) from None
    check_fits([m["content"] for m in dialog], tokenizer, max_seq_len, "messages")
    try:
        if tool_format:
            validator(tokenizer)(dialog, 0)
        else:
            validate_dialog(dialog, path="messages")
    except (TypeError, ValueError) as error:  # (a tool dialog's errors name "dialog 1")
        raise ApiError(400, re.sub(r"^dialog 1\b", "messages", str(error)),
                       "messages") from None
    job.refused = has_special_tags(tokenizer, dialog)
    if job.refused:
        job.prompts, job.limits = [[]], [0]
    else:
        job.prompts = [tool_dialog_tokens(tokenizer, dialog) if tool_format
                       else dialog_tokens(tokenizer, dialog)]
        _limits(job, body, ("max_tokens", "max_completion_tokens"), max_seq_len, "messages")
    job.logprobs = _boolean(body, "logprobs")
    job.top_logprobs = _integer(body, "top_logprobs", 0, 20) or 0
    if job.top_logprobs and not job.logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    openai_options.read_options(job, body, tokenizer)
    return job


ROLES = ("system", "user", "assistant", "tool")


def _messages(messages) -> List[Dict[str, Any]]:
    """OpenAI's messages read: each content a str (text parts joined; null for an assistant
    that calls tools), the other fields kept (tool_calls, tool_call_id, name)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} "
                            "objects", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", where)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got "
                                f"{role!r}", f"{where}.role")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"{where}.content parts must be {{\"type\": \"text\", "
                                    f"\"text\": ...}}", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if content is None and role == "assistant" and message.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string, got "
                                f"{type(content).__name__}", f"{where}.content")
        out.append({**message, "content": _utf8(content, f"{where}.content")})
    return out


def parse_completion(body, tokenizer, max_seq_len: int, model_name: str) -> Job:
    job = _common(body, COMPLETION_FIELDS, model_name)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str)
                                                               for p in prompts):
        raise ApiError(400, "'prompt' must be a string or a non-empty list of strings",
                       "prompt")
    names = _prompt_names("prompt", len(prompts))
    job.texts = [_utf8(p, "prompt", name) for p, name in zip(prompts, names)]
    for text, name in zip(prompts, names):
        check_fits([text], tokenizer, max_seq_len, "prompt", name)
    job.prompts = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    _limits(job, body, ("max_tokens",), max_seq_len, "prompt")
    top = _integer(body, "logprobs", 0, 5)
    job.logprobs, job.top_logprobs = top is not None, top or 0
    job.echo = _boolean(body, "echo")
    if job.echo and job.logprobs:
        raise ApiError(400, "'echo' with 'logprobs' is not supported (no prompt logprobs)",
                       "echo")
    openai_options.read_options(job, body, tokenizer)
    return job


# ---------------------------------------------------------------------- responses
def token_text(tokenizer, token: int) -> Tuple[str, List[int]]:
    """A token's text as it sits inside a longer text, and its bytes (the tokenizer's
    token_text: SentencePiece's or tiktoken's pieces)."""
    return tokenizer.token_text(token)


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(tokenizer, tokens, logprobs, top) -> Dict[str, Any]:
    content = []
    for i, (token, logprob) in enumerate(zip(tokens, logprobs)):
        text, raw = token_text(tokenizer, token)
        alternatives = []
        for alt, alt_logprob in (top[i] if i < len(top) else []):
            alt_text, alt_raw = token_text(tokenizer, alt)
            alternatives.append({"token": alt_text, "logprob": alt_logprob, "bytes": alt_raw})
        content.append({"token": text, "logprob": logprob, "bytes": raw,
                        "top_logprobs": alternatives})
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, tokens, logprobs, top, offset: int) -> Dict[str, Any]:
    texts = [token_text(tokenizer, t)[0] for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    tops = [{token_text(tokenizer, alt)[0]: lp for alt, lp in row} for row in top]
    return {"tokens": texts, "token_logprobs": list(logprobs),
            "top_logprobs": tops if top else None, "text_offset": offsets}


def envelope(job: Job, request_id: str, created: int, model_name: str, chunk: bool):
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if job.chat else \
        "text_completion"
    return {"id": request_id, "object": kind, "created": created, "model": model_name,
            "system_fingerprint": None}


def now() -> int:
    return int(time.time())
