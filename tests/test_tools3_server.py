"""Tool calls through the server on a random Llama-3-shaped model (Meta's tokenizer), with the
official `openai` client: Llama 3.1's own format, a round trip, arguments that validate
against the function's schema (only the grammar can make them: the weights are random), and
tool calls streamed as OpenAI streams them (the client's own stream helper accumulates them
into the non-streamed answer)."""

import json

import jsonschema
import pytest

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")
pytest.importorskip("fastapi")

from llama.checkpoints.fixtures import random_weights  # noqa: E402
from tests.llama3_reference import meta_tokenizer_path  # noqa: E402
from tests.server_fixtures import running_server, streamed_arguments  # noqa: E402
from tests.test_llama3_generation import ARGS, write  # noqa: E402
from tests.test_tools3 import SCHEMAS, TIME, WEATHER  # noqa: E402

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(pattern="^[A-Za-z ]{0,12}$")
    unit: str = pydantic.Field(pattern="^(celsius|fahrenheit)$")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    ckpt = write(tmp_path_factory.mktemp("tools3-server") / "ckpt",
                 random_weights(ARGS, seed=43))
    with running_server("--ckpt_dir", ckpt, "--tokenizer_path", meta_tokenizer_path(),
                        "--max_seq_len", "512", "--max_batch_size", "4",
                        "--model_name", "llama3-random", timeout=240) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def create(client, **kwargs):
    kwargs = {"model": "llama3-random", "messages": ASK, "tools": [WEATHER, TIME],
              "tool_choice": "required", "temperature": 1.0, "seed": 3, "max_tokens": 60,
              **kwargs}
    return client.chat.completions.create(**kwargs)


def test_round_trip(client):
    answer = create(client).choices[0]
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    (call,) = answer.message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    messages = ASK + [answer.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    final = create(client, messages=messages, tool_choice="none", temperature=0,
                   max_tokens=10).choices[0]
    assert final.message.tool_calls is None and isinstance(final.message.content, str)
    named = create(client, tool_choice={"type": "function", "function": {"name": "get_time"}},
                   seed=4).choices[0].message.tool_calls
    assert [c.function.name for c in named] == ["get_time"]
    jsonschema.validate(json.loads(named[0].function.arguments), SCHEMAS["get_time"])


@pytest.mark.parametrize("seed", [3, 8])
def test_streamed_calls_are_openai_s_deltas(client, seed):
    whole = create(client, seed=seed).choices[0].message.tool_calls
    deltas, finish = [], None
    for chunk in create(client, seed=seed, stream=True):
        choice = chunk.choices[0]
        deltas += choice.delta.tool_calls or []
        finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    first, rest = deltas[0], deltas[1:]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (
        0, "function", whole[0].function.name, "")
    assert first.id.startswith("call_")
    assert len(rest) > 1  # the arguments come in pieces, as they are written
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    assert "".join(d.function.arguments for d in rest) == whole[0].function.arguments


def test_the_client_s_stream_helper_accumulates_the_call(client):
    tool = openai.pydantic_function_tool(Weather, name="get_weather")
    kwargs = dict(model="llama3-random", messages=ASK, tools=[tool], tool_choice="required",
                  temperature=1.0, seed=5, max_tokens=60)
    pieces, final = streamed_arguments(client, kwargs)
    (call,) = final.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, Weather)  # pydantic validated it
    assert len(pieces) > 1 and "".join(pieces) == call.function.arguments
    assert call.function.arguments == create(client, tools=[tool], seed=5).choices[
        0].message.tool_calls[0].function.arguments
