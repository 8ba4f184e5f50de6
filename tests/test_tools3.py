"""Tool calls in Llama 3.1's own format (llama/constrained/tools3.py) against Meta's
llama-models: the prompt is the "JSON based tool calling" prompt its prompt_format.md shows,
a whole tool-using dialog is ChatFormat's tokens, Meta's parser reads the answers the grammar
allows; and the library's chat_completion with tools on a random Llama-3-shaped model, where
only the grammar can make the calls valid."""

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from llama import Llama
from llama.checkpoints.fixtures import random_weights
from llama.constrained.calling import (
    grammar,
    parse_tools,
    tool_dialog,
    tool_dialog_tokens,
)
from llama.constrained.grammar import vocabulary
from llama.engine.validation import ArgumentValueError
from llama.tokenizers import load_tokenizer
from tests.llama3_reference import meta_package, meta_tokenizer, meta_tokenizer_path
from tests.test_llama3_generation import ARGS, write

DATE = "21 September 2024"  # the date of Meta's example
LISTED = "Here is a list of functions in JSON format:\n"
RETURN = "\n\nReturn function calls in JSON format."
TRENDING = {"type": "function", "function": {
    "name": "trending_songs", "description": "Returns the trending songs on a Music site",
    "parameters": {"type": "object", "properties": {
        "n": {"type": "integer", "description": "The number of songs to return"},
        "genre": {"type": "string", "description": "The genre of the songs to return"}},
        "required": ["n"]}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object",
                   # ASCII strings: the test joins the answer's tokens' texts
                   "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{0,12}$"},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object",
                                       "properties": {"zone": {"type": "string",
                                                               "pattern": "^[A-Z]{0,8}$"}},
                                       "required": ["zone"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer(meta_tokenizer_path())


@pytest.fixture(scope="module")
def meta():
    return meta_tokenizer()


def meta_example():
    """The "JSON based tool calling" example of llama-models' Llama 3.1 prompt_format.md:
    (its input prompt, its model response)."""
    md = (Path(meta_package().__file__).parent / "llama3_1" / "prompt_format.md").read_text()
    section = md[md.index("## JSON based tool calling"):]
    fenced = []
    at = 0
    for _ in range(2):
        start = section.index("```\n", at) + 4
        at = section.index("\n```", start)
        fenced.append(section[start:at])
        at += 4
    return fenced[0], fenced[1]


def turns(prompt):
    """The contents of a prompt's turns, by role, as written between the headers."""
    out = []
    for part in prompt.split("<|start_header_id|>")[1:]:
        role, rest = part.split("<|end_header_id|>\n\n", 1)
        out.append((role, rest.rsplit("<|e", 1)[0] if "<|e" in rest else rest))
    return out


def test_the_prompt_is_meta_s_json_tool_calling_prompt(ours):
    prompt, _ = meta_example()
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Use tools to get latest trending songs"}]
    dialog = tool_dialog(ours, messages, parse_tools([TRENDING], "auto"), DATE)
    text = ours.decode(tool_dialog_tokens(ours, dialog))
    # Meta's template writes each parameter as {"type": "object", "description"} in a list;
    # an OpenAI tool's parameters are a JSON schema, listed as they are
    head, rest = prompt.split(LISTED)
    tail = rest.split(RETURN)[1]
    assert text == head + LISTED + json.dumps(TRENDING, indent=4) + RETURN + tail


def meta_tokens(meta, messages):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat

    return ChatFormat(meta).encode_dialog_prompt([RawMessage(**m) for m in messages]).tokens


def test_a_tool_dialog_is_meta_s_tokens(ours, meta):
    from llama_models.datatypes import StopReason, ToolCall

    prompt, _ = meta_example()
    (_, system), (_, functions) = turns(prompt)[:2]
    arguments = {"city": "Paris", "unit": "celsius"}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "21 degrees."},
        {"role": "user", "content": "And the time there?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_2", "type": "function",
             "function": {"name": "get_time", "arguments": '{"zone":"CET"}'}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "10:00"}]
    dialog = tool_dialog(ours, messages, parse_tools([WEATHER, TIME], "required"), DATE)
    listing = "".join(json.dumps(t, indent=4) + "\n" for t in (WEATHER, TIME))
    expected = meta_tokens(meta, [
        {"role": "system",
         "content": system.replace("You are a helpful assistant.", "Be brief.")},
        {"role": "user", "content": functions.split(LISTED)[0] + LISTED + listing
         + RETURN[1:]},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "stop_reason": StopReason.end_of_message,
         "tool_calls": [ToolCall(call_id="1", tool_name="get_weather", arguments=arguments)]},
        {"role": "tool", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "21 degrees.", "stop_reason": StopReason.end_of_turn},
        {"role": "user", "content": "And the time there?"},
        {"role": "assistant", "content": "", "stop_reason": StopReason.end_of_message,
         "tool_calls": [ToolCall(call_id="2", tool_name="get_time",
                                 arguments={"zone": "CET"})]},
        {"role": "tool", "content": "10:00"}])
    assert tool_dialog_tokens(ours, dialog) == expected
    text = ours.decode(expected)
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n10:00<|eot_id|>" in text
    assert '{"type": "function", "name": "get_time", "parameters": {"zone": "CET"}}<|eom_id|>' \
        in text
    # without functions offered, the calls and results are written the same way
    bare = tool_dialog(ours, messages[1:], None)
    assert ours.decode(tool_dialog_tokens(ours, bare)) == "<|begin_of_text|>" + text.split(
        "<|eot_id|>", 2)[2]


@pytest.mark.parametrize("dialog, message", [
    ([{"role": "user", "content": "a"}, {"role": "ipython", "content": "b"}],
     "must follow a call"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "assistant", "content": "c"}], "must follow a user or ipython turn"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     "last message must be from the user or a tool"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
     "role must be one of"),
])
def test_bad_tool_dialogs_are_refused(ours, dialog, message):
    with pytest.raises(ValueError, match=message):
        tool_dialog_tokens(ours, dialog, index=3)


def test_the_grammar_takes_meta_s_calls_and_refuses_bad_arguments(ours):
    vocab = vocabulary(ours, 128256)
    spec = grammar(ours, parse_tools([WEATHER, TIME], "required"))
    tag = ours.special_tokens["<|python_tag|>"]
    good = [[tag] + ours.encode('{"name": "get_weather", "parameters": {"city": "Paris", '
                                '"unit": "celsius"}}', bos=False, eos=False),
            ours.encode('{"type": "function", "name": "get_time", "parameters": '
                        '{"zone": "CET"}}', bos=False, eos=False)]
    for tokens in good:
        matcher = vocab.matcher(spec)
        assert matcher.consume_tokens(tokens + [ours.eom_id]), ours.decode(tokens)
    for bad in ['{"name": "get_weather", "parameters": {"city": 3, "unit": "celsius"}}',
                '{"name": "get_weather", "parameters": {"city": "Paris"}}',
                '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "kelvin"}}',
                '{"name": "nope", "parameters": {}}',
                '{"name":"get_time","parameters":{"zone":"CET"}}']:  # json.dumps' spacing only
        matcher = vocab.matcher(spec)
        tokens = ours.encode(bad, bos=False, eos=False) + [ours.eom_id]
        assert not (matcher.consume_tokens(tokens) and matcher.is_stopped()), bad


# ------------------------------------------------------------------ on a random Llama 3 model
@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    ckpt = write(tmp_path_factory.mktemp("tools3") / "ckpt", random_weights(ARGS, seed=41))
    return Llama.build(ckpt, meta_tokenizer_path(), max_seq_len=512, max_batch_size=4,
                       verbose=False, device="cpu")


def ask(llama3, tool_choice, seed, logprobs=False, tools=(WEATHER, TIME)):
    torch.manual_seed(seed)
    dialogs = [[{"role": "user", "content": question}]
               for question in ("Weather in Paris?", "What time is it in Tokyo?")]
    return llama3.chat_completion(dialogs, temperature=1.0, top_p=1.0, max_gen_len=60,
                                  tools=list(tools), tool_choice=tool_choice,
                                  logprobs=logprobs)


@pytest.mark.parametrize("seed", range(3))
def test_every_call_validates_and_meta_s_parser_reads_it(llama3, meta, seed):
    from llama_models.datatypes import StopReason
    from llama_models.llama3.chat_format import ChatFormat

    for answer in ask(llama3, "required", seed, logprobs=True):
        assert answer["finish_reason"] == "tool_calls"
        (call,) = answer["generation"]["tool_calls"]
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
        raw = "".join(answer["tokens"])  # the model's answer as it wrote it
        read = ChatFormat(meta).decode_assistant_message_from_content(
            raw, StopReason.end_of_message)
        assert [(c.tool_name, c.arguments) for c in read.tool_calls] == [
            (name, json.loads(arguments))], raw


def test_named_auto_and_none(llama3):
    named = {"type": "function", "function": {"name": "get_time"}}
    for answer in ask(llama3, named, 0):
        (call,) = answer["generation"]["tool_calls"]
        assert call["function"]["name"] == "get_time"
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS["get_time"])
    kinds = set()
    for seed in range(2):
        for answer in ask(llama3, "auto", seed):
            calls = answer["generation"].get("tool_calls")
            if calls:
                kinds.add("call")
                jsonschema.validate(json.loads(calls[0]["function"]["arguments"]),
                                    SCHEMAS[calls[0]["function"]["name"]])
            else:
                kinds.add("text")
                assert not answer["generation"]["content"].lstrip().startswith(("{", "<|"))
    assert kinds  # (which branch a random model takes is its own business)
    for answer in ask(llama3, "none", 1):
        assert "tool_calls" not in answer["generation"]


def test_a_round_trip_in_the_library(llama3):
    dialog = [{"role": "user", "content": "Weather in Paris?"}]
    torch.manual_seed(5)
    first = llama3.chat_completion([dialog], temperature=1.0, max_gen_len=60, tools=[WEATHER],
                                   tool_choice="required")[0]["generation"]
    (call,) = first["tool_calls"]
    dialog += [first, {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
    final = llama3.chat_completion([dialog], temperature=0, max_gen_len=8, tools=[WEATHER],
                                   tool_choice="none")[0]
    assert "tool_calls" not in final["generation"]
    with pytest.raises(ArgumentValueError, match="^response_format"):
        llama3.chat_completion([dialog], tools=[WEATHER], response_format={"type": "json_object"})
    with pytest.raises(ArgumentValueError, match="^tool_choice"):
        llama3.chat_completion([dialog], tools=[WEATHER], tool_choice="sometimes")
