"""Tool calls in the format of the tokenizer's family, for the library and the server alike:
Llama 2's JSON convention (tools.py) or Llama 3.1's own (tools3.py). Each gives the dialog
with the functions told and the calls and results written its way, the grammar of an answer,
and where the calls sit in an answer (read whole, or piece by piece as it streams)."""

from typing import Any, Dict, List, Optional, Tuple

from llama import chat_format, chat_format3
from llama.constrained import tools as llama2
from llama.constrained import tools3 as llama3
from llama.constrained.call_stream import CallScanner, CallShape, openai_calls
from llama.constrained.grammar import GrammarSpec
from llama.constrained.tools import ToolError, Tools, parse_tools
from llama.tokenizers import family

__all__ = ["ToolError", "Tools", "parse_tools", "uses_tools", "tool_dialog",
           "tool_dialog_tokens", "grammar", "shape", "parse_calls", "CallScanner",
           "library_prompts"]


def uses_tools(messages: Any) -> bool:
    """Whether OpenAI-style messages hold tool calls or results (then they need a tool
    format, even when no function is offered this time)."""
    return isinstance(messages, (list, tuple)) and any(
        isinstance(m, dict) and (m.get("role") == "tool"
                                 or (m.get("role") == "assistant" and m.get("tool_calls")))
        for m in messages)


def tool_dialog(tokenizer, messages: List[Any], tools: Optional[Tools],
                date: Optional[str] = None) -> List[Dict[str, Any]]:
    """The messages in the family's format, the functions told when `tools` offers some.
    `date`: Llama 3.1's "Today Date" (default today)."""
    if family(tokenizer) == "llama3":
        return llama3.dialog(messages, tools, date)
    return llama2.dialog(messages, tools)


def tool_dialog_tokens(tokenizer, dialog: List[Dict[str, Any]], index: int = 0) -> List[int]:
    """The prompt's tokens for a tool_dialog (validated: TypeError/ValueError naming dialog
    `index`)."""
    if family(tokenizer) == "llama3":
        return chat_format3.tool_dialog_to_tokens(dialog, tokenizer, index)
    return chat_format.dialog_to_tokens(dialog, tokenizer.encode, index)


def validator(tokenizer):
    """validate(dialog, index) for a tool_dialog of the family."""
    if family(tokenizer) == "llama3":
        return chat_format3.validate_tool_dialog
    return chat_format.validate_dialog


def grammar(tokenizer, tools: Tools) -> GrammarSpec:
    if family(tokenizer) == "llama3":
        return llama3.grammar(tools, tokenizer.special_tokens[llama3.PYTHON_TAG])
    return llama2.grammar(tools)


def shape(tokenizer) -> CallShape:
    return llama3.SHAPE if family(tokenizer) == "llama3" else llama2.SHAPE


def parse_calls(tokenizer, text: str) -> Optional[List[Dict[str, Any]]]:
    """OpenAI's tool_calls of an answer (None for a text answer)."""
    return openai_calls(shape(tokenizer), text)


def library_prompts(tokenizer, dialogs, tools: Any, tool_choice: Any,
                    spec: Optional[GrammarSpec]) -> Tuple[List[List[Dict[str, Any]]],
                                                          List[List[int]], Optional[Tools],
                                                          Optional[GrammarSpec]]:
    """For Llama.chat_completion: each dialog in the tool format and its prompt's tokens,
    the offered tools (None: none may be called) and the answers' grammar (`spec`, the
    response_format's, when no tool is offered). Errors are ArgumentErrors naming the
    argument."""
    from llama.engine.validation import ArgumentValueError, check_dialog

    try:
        offered = parse_tools(tools, tool_choice)
        converted = [tool_dialog(tokenizer, dialog, offered) for dialog in dialogs]
    except ToolError as error:
        param = error.param if error.param.startswith("tool") else "dialogs"
        raise ArgumentValueError(param, f"{param}: {error}") from None
    except (TypeError, AttributeError):  # not a list of messages: said by check_dialog
        converted = list(dialogs)
    prompts = []
    for index, dialog in enumerate(converted):
        check_dialog(dialog, index, validator(tokenizer))
        prompts.append(tool_dialog_tokens(tokenizer, dialog, index))
    if offered is not None:
        if spec is not None:
            raise ArgumentValueError("response_format", "response_format cannot be combined "
                                                        "with tools: leave one out")
        spec = grammar(tokenizer, offered)
    return converted, prompts, offered, spec


def library_answer(tokenizer, prediction: Dict[str, Any], offered: Optional[Tools]
                   ) -> Dict[str, Any]:
    """A chat_completion prediction; when tools were offered and the answer is a call, the
    assistant message gets OpenAI's `tool_calls` (content ""), finish_reason "tool_calls"."""
    if offered is None:
        return prediction
    calls = parse_calls(tokenizer, prediction["generation"]["content"])
    if calls:
        prediction["generation"] = {"role": "assistant", "content": "", "tool_calls": calls}
        prediction["finish_reason"] = "tool_calls"
    return prediction
