"""Tool calling in Llama 3.1's own format: Meta's "JSON based tool calling" for custom tools,
as llama-models documents it (llama_models/llama3_1/prompt_format.md) and its ChatFormat
writes it:

    system:    Environment: ipython\\n\\nCutting Knowledge Date: December 2023\\n
               Today Date: 21 September 2024\\n\\n{the dialog's system prompt}\\n
    user:      Answer the user's question by making use of the following functions if
               needed. ... Here is a list of functions in JSON format:\\n{each function as
               {"type": "function", "function": {...}}, indented by 4}\\n\\nReturn function
               calls in JSON format.
    user:      {the question}
    assistant: <|python_tag|>{"name": ..., "parameters": {...}}<|eom_id|>   (the model)
    ipython:   {the function's result}
    assistant: {the answer}<|eot_id|>

An earlier assistant turn that called a function is written as ChatFormat writes one:
{"type": "function", "name": ..., "parameters": {...}} (json.dumps' spacing), ended by
<|eom_id|>. Tool results are ipython turns, one per result. One call per answer: Meta's
format has no parallel calls. The functions' parameters are listed as the JSON schemas they
are (Meta's template writes its own parameter type instead; an OpenAI tool has a schema).
"""

import datetime
import json
from typing import Any, Dict, List, Optional

from llama.constrained.call_stream import CallShape
from llama.constrained.grammar import GrammarSpec, closed_objects
from llama.constrained.tools import CHOICES, ToolError, Tools

SYSTEM = "Environment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: {today}\n"
FUNCTIONS_HEAD = ("Answer the user's question by making use of the following functions if "
                  "needed.\nIf none of the function can be used, please say so.\nHere is a "
                  "list of functions in JSON format:\n")
FUNCTIONS_TAIL = "\nReturn function calls in JSON format."
PYTHON_TAG = "<|python_tag|>"
SHAPE = CallShape(depth=1, name_key="name", args_key="parameters", prefix=PYTHON_TAG)
# json.dumps' separators, as the calls in the prompt are written (and the model was taught)
SEPARATORS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


def today() -> str:
    """The date as Meta's system prompt gives it: "21 September 2024"."""
    return datetime.date.today().strftime("%d %B %Y")


def system_text(system: Optional[str], date: str) -> str:
    text = SYSTEM.format(today=date)
    return text if system is None else f"{text}\n{system}\n"


def functions_text(tools: Tools) -> str:
    """Meta's user turn listing the functions (a function without a description is listed
    without one)."""
    functions = [{key: value for key, value in function.items()
                  if key != "description" or value} for function in tools.offered]
    listed = "".join(json.dumps({"type": "function", "function": function}, indent=4,
                                ensure_ascii=False) + "\n" for function in functions)
    return FUNCTIONS_HEAD + listed + FUNCTIONS_TAIL


def call_text(name: str, arguments: Any) -> str:
    """An earlier call as Meta's ChatFormat writes it back (ToolUtils.encode_tool_call)."""
    return json.dumps({"type": "function", "name": name, "parameters": arguments})


def dialog(messages: List[Any], tools: Optional[Tools], date: Optional[str] = None
           ) -> List[Dict[str, Any]]:
    """OpenAI's messages as a Llama 3 dialog: the functions told (when tools are offered),
    assistant calls as `tool_calls` texts, tool results as ipython turns. Other messages
    pass unchanged; the dialog is validated when it is tokenized."""
    out: List[Dict[str, Any]] = []
    rest = list(messages)
    if tools is not None:
        first = rest[0] if rest else None
        system = None
        if isinstance(first, dict) and first.get("role") == "system":
            system = first.get("content")
            rest = rest[1:]
            if not isinstance(system, str):
                raise ToolError("messages[0].content", "messages[0].content of a system "
                                                       "message must be a string")
        out += [{"role": "system", "content": system_text(system, date or today())},
                {"role": "user", "content": functions_text(tools)}]
    for i, message in enumerate(rest, start=len(messages) - len(rest)):
        if not isinstance(message, dict):
            out.append(message)
        elif message.get("role") == "assistant" and message.get("tool_calls"):
            out.append({"role": "assistant", "content": message.get("content") or "",
                        "tool_calls": [call_text(name, arguments) for name, arguments
                                       in _calls(message["tool_calls"], i)]})
        elif message.get("role") == "tool":
            content = message.get("content")
            if not isinstance(content, str):
                raise ToolError(f"messages[{i}].content", f"messages[{i}].content of a tool "
                                                          f"message must be a string")
            out.append({"role": "ipython", "content": content})
        else:
            out.append(message)
    return out


def _calls(tool_calls: Any, i: int):
    try:
        return [(call["function"]["name"], json.loads(call["function"]["arguments"]))
                for call in tool_calls]
    except (TypeError, KeyError, ValueError):
        raise ToolError(f"messages[{i}].tool_calls", f"messages[{i}].tool_calls must be "
                                                     f"OpenAI's tool calls, with JSON "
                                                     f"arguments") from None


def call_schema(tools: Tools) -> Dict[str, Any]:
    """A call answer's JSON schema: one of the offered functions, its parameters valid
    against the function's schema ("type": "function" may come first, as Meta writes calls
    back)."""
    calls = [{"type": "object",
              "properties": {"type": {"const": "function"}, "name": {"const": f["name"]},
                             "parameters": f["parameters"]},
              "required": ["name", "parameters"]} for f in tools.offered]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return dict(closed_objects(schema), **{"x-guidance": SEPARATORS})


def grammar(tools: Tools, python_tag_id: int) -> GrammarSpec:
    """The answer's grammar: a call, after an optional <|python_tag|> (as the model writes
    it with "Environment: ipython"); with "auto", a call or text whose first characters
    after spaces are neither "{" nor "<|"."""
    call = f"call: <[{python_tag_id}]>? %json {json.dumps(call_schema(tools))}\n"
    if tools.choice not in CHOICES or tools.choice == "required":
        return GrammarSpec.lark("start: call\n" + call)
    return GrammarSpec.lark("start: call | text\n" + call
                            + "text: /\\s*([^\\s{<]|<[^|])(?s:.)*/\n")
