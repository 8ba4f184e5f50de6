"""A tool-call answer read as it arrives: where each call starts (its function's name) and the
raw text of its arguments, piece by piece, as OpenAI streams `tool_calls` deltas. The same
reading of the whole answer gives the non-streamed calls, so the streamed argument pieces
joined always equal the non-streamed arguments.

The answer is JSON that the grammar guarantees (tools.py, tools3.py): a call is an object at
a known depth, with a name under `name_key` before its arguments under `args_key`. The
arguments are passed on as the model wrote them (a slice of the answer), not re-serialized.
"""

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class CallShape:
    """Where the calls sit in an answer. prefix: text a call answer may begin with (Llama
    3.1's <|python_tag|>); depth: containers open inside a call object (1: the answer is the
    call; 3: {"tool_calls": [call, ...]})."""
    depth: int
    name_key: str
    args_key: str
    prefix: str = ""


@dataclass
class _Frame:
    kind: str  # "{" or "["
    key: Optional[str] = None  # an object's current key
    wants_key: bool = True  # an object's next string is a key


@dataclass
class CallDelta:
    """A call's start (name set, arguments "") or a piece of its arguments."""
    index: int
    arguments: str
    name: Optional[str] = None


@dataclass
class CallScanner:
    shape: CallShape
    calls: List[Dict[str, str]] = field(default_factory=list)  # {"name", "arguments"}
    _stack: List[_Frame] = field(default_factory=list)
    _string: Optional[List[str]] = None  # the string being read (None: outside strings)
    _escaped: bool = False
    _args: str = "closed"  # "closed", "pending" (after the key's ':'), "open"
    _head: str = ""  # characters before the JSON (prefix, spaces)
    _started: bool = False

    def feed(self, text: str) -> List[CallDelta]:
        """What a new piece of the answer adds: starts of calls, pieces of arguments (the
        pieces of one call in one piece of text come joined)."""
        out: List[CallDelta] = []
        for char in text:
            self._char(char, out)
        return out

    def _char(self, char: str, out: List[CallDelta]) -> None:
        depth = self.shape.depth
        if not self._stack and self._string is None:
            if char != "{" or self.starts_a_call() is False:
                self._head += char  # the prefix and spaces before a call, or a text answer
                return
        at_call = len(self._stack) == depth
        if self._args == "pending" and not char.isspace():
            self._args = "open"
        if self._args == "open":
            if self._string is None and at_call and char in ",}":
                self._args = "closed"
            else:
                self._emit(char, out)
        if self._string is not None:
            self._in_string(char, at_call, out)
        elif char == '"':
            self._string = []
        elif char in "{[":
            self._stack.append(_Frame(char))
            self._started = True
            if char == "{" and len(self._stack) == depth:
                self.calls.append({"name": "", "arguments": ""})
        elif char in "}]":
            self._stack.pop()
        elif char == ",":
            if self._stack and self._stack[-1].kind == "{":
                self._stack[-1].wants_key = True
        elif char == ":" and at_call and self._stack[-1].key == self.shape.args_key:
            self._args = "pending"

    def _in_string(self, char: str, at_call: bool, out: List[CallDelta]) -> None:
        if self._escaped:
            self._escaped = False
        elif char == "\\":
            self._escaped = True
        elif char == '"':
            raw, self._string = "".join(self._string), None
            frame = self._stack[-1] if self._stack else None
            if frame is None or frame.kind != "{":
                return
            if frame.wants_key:
                frame.key, frame.wants_key = json.loads(f'"{raw}"'), False
            elif at_call and frame.key == self.shape.name_key:
                name = json.loads(f'"{raw}"')
                self.calls[-1]["name"] = name
                out.append(CallDelta(len(self.calls) - 1, "", name))
            return
        self._string.append(char)

    def _emit(self, char: str, out: List[CallDelta]) -> None:
        index = len(self.calls) - 1
        self.calls[index]["arguments"] += char
        if out and out[-1].index == index and out[-1].name is None:
            out[-1].arguments += char
        else:
            out.append(CallDelta(index, char))

    def starts_a_call(self) -> Optional[bool]:
        """Whether the answer so far is a call (True), text (False), or cannot tell yet
        (None: only spaces so far)."""
        if self._started:
            return True
        head = self._head.lstrip()
        if not head:
            return None
        # the prefix is one special token: it comes whole, and a call follows it
        return bool(self.shape.prefix) and head == self.shape.prefix


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def openai_calls(shape: CallShape, text: str) -> Optional[List[Dict[str, Any]]]:
    """OpenAI's tool_calls of a whole answer (None when it is text, not a call)."""
    scanner = CallScanner(shape)
    scanner.feed(text)
    if not scanner.calls:
        return None
    return [{"id": new_call_id(), "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}}
            for call in scanner.calls]
