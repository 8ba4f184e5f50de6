"""Reading tool-call answers piece by piece (llama/constrained/call_stream.py): whatever the
cut into pieces, the streamed argument pieces joined equal the arguments read from the
whole answer, which are the model's own text of them (checked against json's parse)."""

import json
import random

import pytest

from llama.constrained import tools, tools3
from llama.constrained.call_stream import CallScanner, openai_calls

LLAMA2 = [
    '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}]}',
    ' {"tool_calls":[{"name":"a","arguments":{"s":"},{\\"x\\":[1,2]}\\\\"}},'
    '{"name":"b\\"c","arguments":{"n":[{"k":{}},[]],"t":true}}]}',
    '{"tool_calls":[{"name":"f","arguments":{}}]}',
]
LLAMA3 = [
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris, \\"FR\\"", '
    '"unit": "celsius"}}',
    '{"type": "function", "name": "f", "parameters": {"a": [1, {"b": "}"}], "c": null}}',
    '{"name": "x", "parameters": {}}',
]


def expected(text, calls_of):
    """(name, arguments as JSON values) of each call, by json's parse of the answer."""
    start = text.index("{")
    return [(c["name"], c["arguments" if "arguments" in c else "parameters"])
            for c in calls_of(json.loads(text[start:]))]


@pytest.mark.parametrize("shape, text, calls_of", [
    *[(tools.SHAPE, t, lambda v: v["tool_calls"]) for t in LLAMA2],
    *[(tools3.SHAPE, t, lambda v: [v]) for t in LLAMA3]])
def test_pieces_join_to_the_whole_answer_s_arguments(shape, text, calls_of):
    whole = openai_calls(shape, text)
    want = expected(text, calls_of)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in whole] == want
    # the arguments are the model's text, not a re-serialization
    for call in whole:
        assert call["function"]["arguments"] in text
        assert call["id"].startswith("call_") and call["type"] == "function"
    rng = random.Random(len(text))
    for trial in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, trial % 9 + 1)))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        scanner = CallScanner(shape)
        names, arguments = {}, {}
        for piece in pieces:
            for delta in scanner.feed(piece):
                if delta.name is not None:
                    assert delta.index not in names and delta.arguments == ""
                    names[delta.index] = delta.name
                else:
                    assert delta.index in names  # a call's name comes before its arguments
                    arguments[delta.index] = arguments.get(delta.index, "") + delta.arguments
        assert [names[i] for i in sorted(names)] == [c["function"]["name"] for c in whole]
        assert [arguments.get(i, "") for i in sorted(names)] == [
            c["function"]["arguments"] for c in whole]


def test_one_character_at_a_time_streams_many_argument_pieces():
    scanner = CallScanner(tools.SHAPE)
    deltas = [d for char in LLAMA2[0] for d in scanner.feed(char)]
    assert deltas[0].name == "get_weather"
    assert len(deltas) == 1 + len('{"city":"Paris","unit":"celsius"}')


@pytest.mark.parametrize("shape, text", [
    (tools.SHAPE, "Hello, {not a call}"), (tools.SHAPE, "  plain text"),
    (tools3.SHAPE, "It is sunny."), (tools3.SHAPE, "a {b}")])
def test_text_answers_are_not_calls(shape, text):
    assert openai_calls(shape, text) is None
    scanner = CallScanner(shape)
    assert scanner.feed(text) == [] and scanner.starts_a_call() is False


def test_a_call_is_known_from_its_first_character_or_the_python_tag():
    scanner = CallScanner(tools3.SHAPE)
    scanner.feed("  ")
    assert scanner.starts_a_call() is None
    scanner.feed("<|python_tag|>")
    assert scanner.starts_a_call() is True
    scanner = CallScanner(tools.SHAPE)
    scanner.feed(" {")
    assert scanner.starts_a_call() is True
