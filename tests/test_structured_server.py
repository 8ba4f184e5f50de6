"""Structured output, tool calls and the rest of the request surface through the server, with
the official `openai` client: answers parse and validate (demo model and random weights),
streamed and not, alone and eight at once; greedy rows are unchanged by constrained ones."""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pydantic = pytest.importorskip("pydantic")
pytest.importorskip("fastapi")

from tests.server_fixtures import running_server, streamed_arguments  # noqa: E402
from tests.structured_schemas import SCHEMAS  # noqa: E402

ASK = [{"role": "user", "content": "Describe a person as JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string"},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object",
                                       "properties": {"zone": {"type": "string"}},
                                       "required": ["zone"]}}}


@pytest.fixture(scope="module")
def server():
    with running_server("--max_batch_size", "8") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def fmt(schema):
    return {"type": "json_schema", "json_schema": {"name": "a", "schema": schema,
                                                   "strict": True}}


def ask(client, schema, stream, seed, max_tokens=100, model="llama-demo"):
    kwargs = dict(model=model, messages=ASK, temperature=1.0, seed=seed,
                  max_tokens=max_tokens, response_format=fmt(schema))
    if not stream:
        return client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = client.chat.completions.create(stream=True, **kwargs)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def valid(text, schema):
    jsonschema.validate(json.loads(text), schema)
    return True


@pytest.mark.parametrize("stream", [False, True])
def test_every_schema_eight_at_once(client, stream):
    jobs = [(name, seed) for name in sorted(SCHEMAS) for seed in range(2)]
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda job: ask(client, SCHEMAS[job[0]], stream, job[1]), jobs))
    for (name, _), text in zip(jobs, texts):
        assert valid(text, SCHEMAS[name]), (name, text)


def test_random_weights_server_only_the_constraint_makes_json(checkpoints, tokenizer_path):
    with running_server("--ckpt_dir", checkpoints("gqa"), "--tokenizer_path", tokenizer_path,
                        "--max_batch_size", "8", "--max_seq_len", "256") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        jobs = [(name, seed, seed % 2 == 0) for name in sorted(SCHEMAS) for seed in range(2)]
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda j: ask(client, SCHEMAS[j[0]], j[2], j[1], 60,
                                                          "gqa-mp1"), jobs))
        for (name, _, _), text in zip(jobs, texts):
            assert valid(text, SCHEMAS[name]), (name, text)
        free = client.chat.completions.create(model="gqa-mp1", messages=ASK, temperature=1.0,
                                              max_tokens=40).choices[0].message.content
        with pytest.raises(ValueError):
            json.loads(free)


def test_greedy_answers_are_the_same_beside_constrained_rows(client):
    def plain(question):
        return client.chat.completions.create(
            model="llama-demo", messages=[{"role": "user", "content": question}],
            temperature=0, max_tokens=40).choices[0].message.content

    def constrained(seed):
        return ask(client, SCHEMAS["nested"], False, seed, 80)

    alone = [plain("What is a list?"), plain("What is a tuple?")]
    constrained_alone = ask(client, SCHEMAS["flat"], False, 5, 60)
    with ThreadPoolExecutor(8) as pool:
        others = [pool.submit(constrained, seed) for seed in range(5)]
        mine = [pool.submit(plain, "What is a list?"), pool.submit(plain, "What is a tuple?"),
                pool.submit(ask, client, SCHEMAS["flat"], False, 5, 60)]
        together = [f.result() for f in mine]
        assert all(valid(f.result(), SCHEMAS["nested"]) for f in others)
    assert together == alone + [constrained_alone]


def test_pydantic_parse_and_json_object(client):
    class Pet(pydantic.BaseModel):
        name: str
        legs: int
        kind: str = pydantic.Field(pattern="^(cat|dog|bird)$")

    parsed = client.beta.chat.completions.parse(
        model="llama-demo", messages=[{"role": "user", "content": "A pet, as JSON."}],
        response_format=Pet, max_tokens=200, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Pet)
    answer = client.chat.completions.create(
        model="llama-demo", messages=ASK, response_format={"type": "json_object"},
        max_tokens=60, temperature=1.0, seed=2)
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    completion = client.completions.create(
        model="llama-demo", prompt="A person:", max_tokens=60, temperature=1.0, seed=3,
        extra_body={"response_format": fmt(SCHEMAS["enum"])})
    assert valid(completion.choices[0].text, SCHEMAS["enum"])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calling_round_trip(client, stream):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    kwargs = dict(model="llama-demo", tools=[WEATHER, TIME], tool_choice="required",
                  temperature=1.0, seed=4, max_tokens=100)
    if stream:  # OpenAI's deltas: a call's first one names it, the next ones add arguments
        calls = {}
        finish = None
        for chunk in client.chat.completions.create(messages=messages, stream=True, **kwargs):
            choice = chunk.choices[0]
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:
                    assert delta.id and delta.type == "function" and delta.function.name
                    assert delta.function.arguments == ""
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name,
                                          "arguments": "", "pieces": 0}
                else:
                    assert delta.id is None and delta.function.name is None
                    calls[delta.index]["arguments"] += delta.function.arguments
                    calls[delta.index]["pieces"] += 1
            finish = choice.finish_reason or finish
        assert finish == "tool_calls" and calls
        calls = [calls[k] for k in sorted(calls)]
        assert all(call["pieces"] > 1 for call in calls)
        whole = client.chat.completions.create(messages=messages, **kwargs).choices[0]
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    else:
        answer = client.chat.completions.create(messages=messages, **kwargs).choices[0]
        assert answer.finish_reason == "tool_calls" and answer.message.content is None
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in answer.message.tool_calls]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in calls:
        assert valid(call["arguments"], schemas[call["name"]])
    messages.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": c["id"], "type": "function",
         "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]})
    for call in calls:
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21"})
    final = client.chat.completions.create(model="llama-demo", messages=messages,
                                           tools=[WEATHER, TIME], tool_choice="none",
                                           temperature=0, max_tokens=30).choices[0]
    assert final.message.content and final.message.tool_calls is None


def test_the_client_s_stream_helper_accumulates_calls(client):
    class Weather(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=12)
        unit: str = pydantic.Field(pattern="^(celsius|fahrenheit)$")

    tool = openai.pydantic_function_tool(Weather, name="get_weather")
    kwargs = dict(model="llama-demo", messages=[{"role": "user", "content": "Weather?"}],
                  tools=[tool], tool_choice="required", temperature=1.0, seed=6,
                  max_tokens=80)
    pieces, final = streamed_arguments(client, kwargs)
    calls = final.choices[0].message.tool_calls
    assert calls and all(isinstance(c.function.parsed_arguments, Weather) for c in calls)
    assert len(pieces) > len(calls) and "".join(pieces) == "".join(
        c.function.arguments for c in calls)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    assert [c.function.arguments for c in whole] == [c.function.arguments for c in calls]


def test_named_function_and_auto(client):
    answer = client.chat.completions.create(
        model="llama-demo", messages=[{"role": "user", "content": "Time in Tokyo?"}],
        tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=1.0, seed=5, max_tokens=60).choices[0]
    assert [c.function.name for c in answer.message.tool_calls] == ["get_time"]
    assert valid(answer.message.tool_calls[0].function.arguments,
                 TIME["function"]["parameters"])
    for seed in range(3):  # one call only when parallel calls are off
        single = client.chat.completions.create(
            model="llama-demo", messages=[{"role": "user", "content": "Weather, time?"}],
            tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
            temperature=1.0, seed=seed, max_tokens=80).choices[0]
        assert len(single.message.tool_calls) == 1
    for seed in range(4):  # either text, or a call that validates
        auto = client.chat.completions.create(
            model="llama-demo", messages=[{"role": "user", "content": "Hello!"}],
            tools=[WEATHER], temperature=1.0, seed=seed, max_tokens=60).choices[0]
        if auto.message.tool_calls:
            assert valid(auto.message.tool_calls[0].function.arguments,
                         WEATHER["function"]["parameters"])
        else:
            assert auto.message.content and not auto.message.content.lstrip().startswith("{")


def test_n_penalties_logit_bias_usage_and_max_completion_tokens(client, server):
    many = client.chat.completions.create(model="llama-demo", messages=ASK, n=3, seed=7,
                                          temperature=1.0, max_tokens=12)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert len({c.message.content for c in many.choices}) > 1  # each choice its own draws
    again = client.chat.completions.create(model="llama-demo", messages=ASK, n=3, seed=7,
                                           temperature=1.0, max_tokens=12)
    assert [c.message.content for c in again.choices] == [c.message.content
                                                          for c in many.choices]
    assert many.usage.completion_tokens == 3 * 12 or any(
        c.finish_reason == "stop" for c in many.choices)
    # logit_bias +100 on one token makes it the only one the model writes
    token = 450  # any ordinary piece of the demo vocabulary
    biased = client.completions.create(model="llama-demo", prompt="A", max_tokens=5,
                                       temperature=0, logit_bias={str(token): 100},
                                       logprobs=1)
    assert biased.choices[0].logprobs.tokens and len(set(biased.choices[0].logprobs.tokens)) == 1
    short = client.chat.completions.create(model="llama-demo", messages=ASK, temperature=0,
                                           max_completion_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="llama-demo", messages=ASK,
                                                 temperature=0, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].choices == []
    assert all(c.usage is None for c in chunks[:-1])
    # penalties change greedy answers that repeat themselves
    plain = client.completions.create(model="llama-demo", prompt="The the the", max_tokens=30,
                                      temperature=0).choices[0].text
    penalized = client.completions.create(model="llama-demo", prompt="The the the",
                                          max_tokens=30, temperature=0, frequency_penalty=2.0,
                                          presence_penalty=2.0).choices[0].text
    assert penalized != plain


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "max_tokens": 1}, "max_tokens"),
    ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"best_of": 2}, "best_of"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_fields_are_refused_by_name(server, body, param):
    response = httpx.post(server + "/v1/chat/completions",
                          json={"messages": ASK, **body}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param

