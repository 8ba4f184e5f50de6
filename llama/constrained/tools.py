"""Tool calling for Llama 2 chat models, which were not trained with a format for it: a JSON
calling convention told in the system prompt, the model's answer constrained to it, and
OpenAI's messages (assistant `tool_calls`, `role: "tool"` results) written in it.

The convention (docs/STRUCTURED_OUTPUT.md): the system prompt lists the functions as JSON;
a call is the answer {"tool_calls": [{"name": ..., "arguments": {...}}]}, nothing else; the
results come back as a user turn {"tool_results": [{"tool_call_id", "name", "content"}]}.
A grammar holds the answer to it: with tool_choice "required" or a named function, the answer
is such a call, arguments valid against the function's parameters; with "auto", either
that or plain text that does not start with "{". Llama 3.1's own format (tools3.py) is
another convention behind the same functions (dialog, grammar, SHAPE for reading calls);
calling.py picks one by the tokenizer's family.
"""

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from llama.constrained.call_stream import CallShape, openai_calls
from llama.constrained.grammar import GrammarSpec

SHAPE = CallShape(depth=3, name_key="name", args_key="arguments")  # {"tool_calls": [call]}

CHOICES = ("none", "auto", "required")


class ToolError(ValueError):
    """A malformed tools, tool_choice or tool message; `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class Tools:
    """The functions a request offers, and how the answer must use them."""
    functions: List[Dict[str, Any]]  # {"name", "description", "parameters"}
    choice: str = "auto"  # "auto", "required", or a function's name (forced)
    parallel: bool = True  # more than one call in an answer (OpenAI's parallel_tool_calls)

    @property
    def offered(self) -> List[Dict[str, Any]]:
        if self.choice in CHOICES:
            return self.functions
        return [f for f in self.functions if f["name"] == self.choice]


def parse_tools(tools: Any, tool_choice: Any) -> Optional[Tools]:
    """OpenAI's `tools` and `tool_choice` (None when no tool may be called)."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise ToolError("tool_choice", "tool_choice needs 'tools' to choose from")
        return None
    if not isinstance(tools, list):
        raise ToolError("tools", "tools must be a list of {\"type\": \"function\", "
                                 "\"function\": {\"name\", \"parameters\"}} objects")
    functions = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" \
                or not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolError(f"tools[{i}]", f"tools[{i}] must be {{\"type\": \"function\", "
                                           f"\"function\": {{\"name\": ..., \"parameters\": "
                                           f"{{...}}}}}}")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ToolError(f"tools[{i}]", f"tools[{i}].function.parameters must be a JSON "
                                           f"schema object")
        functions.append({"name": function["name"],
                          "description": function.get("description", ""),
                          "parameters": parameters})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise ToolError("tools", f"tools must have distinct names, got {names}")
    if tool_choice is None:
        tool_choice = "auto"
    if tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if tool_choice.get("type") != "function" or name not in names:
            raise ToolError("tool_choice", f"tool_choice must name one of the tools "
                                           f"{names}, got {tool_choice!r}")
        return Tools(functions, name)
    if tool_choice not in CHOICES:
        raise ToolError("tool_choice", f"tool_choice must be one of {', '.join(CHOICES)} or "
                                       f"{{\"type\": \"function\", \"function\": {{\"name\": "
                                       f"...}}}}, got {tool_choice!r}")
    return Tools(functions, tool_choice)


def system_prompt(tools: Tools) -> str:
    """What the model is told about the functions (added to the dialog's system prompt)."""
    listed = json.dumps(tools.offered, ensure_ascii=False)
    if tools.choice == "auto":
        how = ("If one of them helps to answer, answer with only a JSON object "
               '{"tool_calls": [{"name": <function name>, "arguments": <arguments object>}]} '
               "and nothing else; otherwise answer normally in plain text.")
    else:
        how = ('Answer with only a JSON object {"tool_calls": [{"name": <function name>, '
               '"arguments": <arguments object>}]} and nothing else.')
    return (f"You can call these functions: {listed}\n{how} The results will come back as "
            f'{{"tool_results": [...]}}.')


def call_schema(tools: Tools) -> Dict[str, Any]:
    """The JSON schema of a call answer: each call one of the offered functions, arguments
    valid against its parameters (one call when a function is named)."""
    calls = [{"type": "object",
              "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
              "required": ["name", "arguments"]} for f in tools.offered]
    items = calls[0] if len(calls) == 1 else {"anyOf": calls}
    array: Dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if tools.choice not in CHOICES or not tools.parallel:
        array["maxItems"] = 1
    return {"type": "object", "properties": {"tool_calls": array}, "required": ["tool_calls"]}


def grammar(tools: Tools) -> GrammarSpec:
    """The answer's grammar: a call; with "auto", a call or text whose first character
    after spaces is not "{"."""
    schema = call_schema(tools)
    if tools.choice != "auto":
        return GrammarSpec.json_schema(schema)
    from llama.constrained.grammar import closed_objects  # the same closing as json_schema answers

    schema = dict(closed_objects(schema), **{"x-guidance": {"whitespace_flexible": False}})
    return GrammarSpec.lark(f'start: call | text\ncall: " "? %json {json.dumps(schema)}\n'
                            f'text: /\\s*[^\\s{{](?s:.)*/\n')


def parse_calls(text: str) -> Optional[List[Dict[str, Any]]]:
    """OpenAI's tool_calls for an answer that is a call (None for a text answer); each
    call's arguments as the model wrote them."""
    return openai_calls(SHAPE, text)


def dialog(messages: List[Any], tools: Optional[Tools]) -> List[Any]:
    """OpenAI's messages in Llama 2's plain roles (convert_messages), the functions told in
    the system prompt when tools are offered."""
    messages = convert_messages(messages)
    if tools is None:
        return messages
    told = system_prompt(tools)
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") == "system" \
            and isinstance(first.get("content"), str):
        return [{"role": "system", "content": f"{first['content']}\n\n{told}"}] + messages[1:]
    return [{"role": "system", "content": told}] + messages


def convert_messages(messages: List[Any]) -> List[Any]:
    """OpenAI messages with tool calls and results written in the convention, as Llama 2's
    plain roles: an assistant's tool_calls become its JSON answer; tool results (and the user
    turn after them, if any) one user turn. Other messages pass unchanged."""
    out: List[Any] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            out.append(message)
            continue
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            out.append({"role": "assistant", "content": _calls_text(message["tool_calls"], i)})
        elif role == "tool":
            result = {"tool_call_id": message.get("tool_call_id"),
                      "name": message.get("name"), "content": message.get("content")}
            if not isinstance(result["content"], str):
                raise ToolError(f"messages[{i}].content", f"messages[{i}].content of a tool "
                                                          f"message must be a string")
            if out and out[-1].get("_tool_results") is not None:
                out[-1]["_tool_results"].append(result)
            else:
                out.append({"role": "user", "_tool_results": [result]})
        elif role == "user" and out and out[-1].get("_tool_results") is not None:
            out[-1]["content"] = message.get("content")
        else:
            out.append(message)
    for message in out:
        results = message.pop("_tool_results", None)
        if results is not None:
            text = json.dumps({"tool_results": results}, ensure_ascii=False)
            after = message.get("content")
            message["content"] = text if after is None else f"{text}\n\n{after}"
    return out


def _calls_text(tool_calls: Any, i: int) -> str:
    try:
        calls = [{"name": call["function"]["name"],
                  "arguments": json.loads(call["function"]["arguments"])}
                 for call in tool_calls]
    except (TypeError, KeyError, ValueError):
        raise ToolError(f"messages[{i}].tool_calls", f"messages[{i}].tool_calls must be "
                                                     f"OpenAI's tool calls, with JSON "
                                                     f"arguments") from None
    return json.dumps({"tool_calls": calls}, ensure_ascii=False)
