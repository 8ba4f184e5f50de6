"""Structured output in the library: on random weights only the constraint can make output
that parses, so every answer parsing and validating is the constraint's work; budgets too
short for a free answer test closing in time; greedy rows match alone and batched."""

import json
import re

import jsonschema
import pytest
import torch

from llama.constrained.constraint import Constraint, apply_masks
from llama.constrained.grammar import GrammarSpec, closed_objects, vocabulary
from llama.engine.validation import ArgumentValueError
from tests.structured_schemas import SCHEMAS

PROMPTS = ["The", "In Python, a class", "Return the", "x = 1", "A list", "def f(", "import",
           "Note:"]


@pytest.fixture(scope="module")
def llama(build):
    return build("gqa", max_seq_len=256, max_batch_size=8)


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False


def json_schema(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@pytest.fixture(scope="module")
def free(llama):
    """The unconstrained model's answers, sampled as the constrained ones are (seed 0)."""
    torch.manual_seed(0)
    return [row["generation"] for row in
            llama.text_completion(PROMPTS, temperature=1.0, top_p=1.0, max_gen_len=40)]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_sampled_answer_validates_eight_at_once(llama, free, name):
    schema = SCHEMAS[name]
    torch.manual_seed(0)
    out = llama.text_completion(PROMPTS, temperature=1.0, top_p=1.0, max_gen_len=80,
                                response_format=json_schema(schema))
    texts = [row["generation"] for row in out]
    assert all(valid(text, schema) for text in texts), texts
    # the unconstrained model does not write JSON: the constraint made these
    assert not any(valid(text, schema) for text in free)


@pytest.mark.parametrize("budget", [40, 48, 60, 80])
def test_budget_runs_out_inside_a_value_and_the_answer_still_closes(llama, budget):
    schema = {"type": "object", "properties": {"text": {"type": "string"},
                                               "more": {"type": "array",
                                                        "items": {"type": "string"}}},
              "required": ["text", "more"]}
    torch.manual_seed(budget)
    out = llama.text_completion(PROMPTS, temperature=1.0, top_p=1.0, max_gen_len=budget,
                                response_format=json_schema(schema))
    for row in out:
        assert valid(row["generation"], schema), row
    # hot sampling would write strings far longer than the budget: closing cut them
    assert any(row["finish_reason"] == "length" for row in out)


def test_budget_smaller_than_the_shortest_answer_is_refused(llama):
    with pytest.raises(ArgumentValueError, match="max_gen_len.*shortest answer"):
        llama.text_completion(["x"], max_gen_len=3, response_format=json_schema(SCHEMAS["flat"]))


def test_greedy_constrained_rows_equal_alone_and_in_a_batch(llama):
    fmt = json_schema(SCHEMAS["nested"])
    alone = [llama.text_completion([p], temperature=0, max_gen_len=80,
                                   response_format=fmt)[0]["generation"] for p in PROMPTS[:4]]
    together = llama.text_completion(PROMPTS[:4], temperature=0, max_gen_len=80,
                                     response_format=fmt)
    assert [row["generation"] for row in together] == alone
    assert all(valid(text, SCHEMAS["nested"]) for text in alone)


def test_json_object_regex_and_lark(llama):
    torch.manual_seed(1)
    out = llama.text_completion(PROMPTS[:4], temperature=1.0, top_p=1.0, max_gen_len=60,
                                response_format={"type": "json_object"})
    assert all(isinstance(json.loads(row["generation"]), dict) for row in out)
    out = llama.text_completion(PROMPTS[:4], temperature=1.0, max_gen_len=20,
                                regex=r"[0-9]{3}-[a-z]{2,4}")
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", row["generation"]) for row in out), out
    lark = 'start: "yes" | "no" | "maybe"'
    out = llama.text_completion(PROMPTS[:4], temperature=1.0, max_gen_len=10, grammar=lark)
    assert all(row["generation"] in ("yes", "no", "maybe") for row in out), out


@pytest.mark.parametrize("option", [{"regex": " yes| no"},
                                    {"grammar": 'start: " " WORD\nWORD: "maybe" | "never"'},
                                    {"regex": r" [0-9]{2}"}])
def test_answers_that_start_with_a_space_match_exactly(llama, option):
    # SentencePiece writes a word's space into its first piece ("▁yes"), which decoding a
    # text alone drops: a completion keeps it, as the text that follows its prompt
    pattern = option.get("regex") or " (maybe|never)"
    answers = set()
    for seed in range(6):
        torch.manual_seed(seed)
        out = llama.text_completion(PROMPTS, temperature=1.0, top_p=1.0, max_gen_len=8,
                                    **option)
        for row in out:
            assert re.fullmatch(pattern, row["generation"]), row
            answers.add(row["generation"])
    assert len(answers) > 1  # sampled, not one forced answer
    torch.manual_seed(0)
    stream = llama.stream_text(PROMPTS[1], temperature=1.0, max_gen_len=8, **option)
    pieces = list(stream)
    assert re.fullmatch(pattern, "".join(pieces)) and "".join(pieces) == stream.text


def test_chat_completion_and_streams_with_a_pydantic_model(llama):
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str
        age: int

    dialog = [{"role": "user", "content": "Who are you? Answer in JSON."}]
    torch.manual_seed(3)
    answer = llama.chat_completion([dialog], temperature=0.9, max_gen_len=60,
                                   response_format=Person)[0]
    Person.model_validate_json(answer["generation"]["content"])
    stream = llama.stream_chat(dialog, temperature=0, max_gen_len=60, response_format=Person)
    pieces = list(stream)
    assert "".join(pieces) == stream.text
    assert stream.text == llama.chat_completion([dialog], temperature=0, max_gen_len=60,
                                                response_format=Person)[0]["generation"][
        "content"]
    Person.model_validate_json(stream.text)


def test_chat_completion_with_tools_in_the_llama2_convention(build):
    llama = build("gqa", max_seq_len=512, max_batch_size=2)  # the functions take room
    parameters = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                   "days": {"type": "integer", "minimum": 1,
                                                            "maximum": 7}},
                  "required": ["city", "days"]}
    forecast = {"type": "function", "function": {"name": "forecast", "parameters": parameters}}
    dialogs = [[{"role": "user", "content": question}] for question in ("Rain?", "Sun?")]
    torch.manual_seed(2)
    for answer in llama.chat_completion(dialogs, temperature=1.0, max_gen_len=80,
                                        tools=[forecast], tool_choice="required"):
        assert answer["finish_reason"] == "tool_calls" and answer["generation"]["content"] == ""
        for call in answer["generation"]["tool_calls"]:
            assert call["function"]["name"] == "forecast"
            jsonschema.validate(json.loads(call["function"]["arguments"]), parameters)
        # the call and its result go back into the dialog
        dialog = dialogs[0] + [answer["generation"], {"role": "tool", "content": "rain"}]
        final = llama.chat_completion([dialog], temperature=0, max_gen_len=10,
                                      tools=[forecast], tool_choice="none")[0]
        assert final["finish_reason"] in ("stop", "length")


def test_bad_options_are_refused_by_name(llama):
    with pytest.raises(ArgumentValueError, match="^response_format.type"):
        llama.text_completion(["x"], response_format={"type": "yaml"})
    with pytest.raises(ArgumentValueError, match="^regex: cannot compile"):
        llama.text_completion(["x"], regex="([a-z")
    with pytest.raises(ArgumentValueError, match="^grammar: give one of"):
        llama.text_completion(["x"], regex="a", grammar='start: "a"')
    with pytest.raises(ArgumentValueError, match="^stop"):
        llama.text_completion(["x"], stop=["}"], response_format={"type": "json_object"})


def test_grammars_are_compiled_once(llama):
    vocab = vocabulary(llama.tokenizer, llama.model.params.vocab_size)
    spec = GrammarSpec.json_schema({"type": "object", "properties": {"q": {"type": "null"}},
                                    "required": ["q"]})
    before = vocab.cached
    first = vocab.matcher(spec)
    assert vocab.cached == before + 1
    vocab.matcher(GrammarSpec.json_schema(json.loads(spec.text)))
    assert vocab.cached == before + 1
    assert first.consume_tokens(llama.tokenizer.encode('{"q":null}', bos=False, eos=False))
    assert first.is_accepting()


def test_only_compact_whitespace_is_allowed(llama):
    """After '{', a space, newline or tab is refused, where free JSON would allow it."""
    vocab = vocabulary(llama.tokenizer, llama.model.params.vocab_size)
    constraint = Constraint(vocab, GrammarSpec.json_object(), 50)
    constraint.commit(llama.tokenizer.encode("{", bos=False, eos=False)[-1])
    mask = torch.empty(1, constraint.words, dtype=torch.int32)
    constraint.fill_mask(mask[0])
    logits = torch.zeros(1, vocab.n_vocab)
    apply_masks(logits, mask, [0])
    allowed = [vocab.tokens[i] for i in torch.nonzero(logits[0] == 0).flatten().tolist()]
    assert allowed and all(not text[:1].isspace() for text in allowed), allowed


def test_closed_objects_only_adds_what_is_missing():
    schema = {"type": "object", "properties": {"a": {"type": "object",
                                                     "properties": {"b": {"enum": [{}]}}}},
              "additionalProperties": True}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is True
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["a"]["properties"]["b"] == {"enum": [{}]}


def test_quantized_model_answers_validate(build):
    llama = build("gqa", max_seq_len=256, max_batch_size=8, quantize="int8")
    torch.manual_seed(5)
    out = llama.text_completion(PROMPTS, temperature=1.0, top_p=1.0, max_gen_len=80,
                                response_format=json_schema(SCHEMAS["pattern"]))
    assert all(valid(row["generation"], SCHEMAS["pattern"]) for row in out), out


def test_engine_rows_with_and_without_constraints_in_one_step(llama):
    """Server-style engine: greedy rows (constrained or not) give the same tokens alone as
    beside other rows, constrained or not, joining at different steps."""
    from llama.constrained.spec import make_constraint
    from llama.engine.core import Engine, EngineSequence

    spec = GrammarSpec.json_schema(SCHEMAS["flat"])
    encode = llama.tokenizer.encode
    n_vocab = llama.model.params.vocab_size

    def sequence(i, constrained):
        seq = EngineSequence(prompt=encode(PROMPTS[i], bos=True, eos=False), limit=50)
        if constrained:
            seq.constraint = make_constraint(llama.tokenizer, n_vocab, spec, 50)
        return seq

    def run(rows, join_every=0):
        engine = Engine(llama.model, llama.tokenizer.eos_id, llama.model.new_cache(8, 128),
                        release_finished=True)
        waiting = list(rows)
        engine.add(waiting.pop(0))
        while waiting or engine.sequences:
            if waiting and (not join_every or engine.steps % join_every == 0):
                engine.add(waiting.pop(0))
            engine.step()
        return [seq.tokens for seq in rows]

    kinds = [True, False, True, False, True, True]
    alone = [run([sequence(i, c)])[0] for i, c in enumerate(kinds)]
    assert run([sequence(i, c) for i, c in enumerate(kinds)], join_every=3) == alone
    for i, c in enumerate(kinds):
        if c:
            assert valid(llama.tokenizer.decode(alone[i]), SCHEMAS["flat"])


def test_penalties_and_bias_follow_openais_formula():
    from llama.engine.penalties import logit_adjust

    adjust = logit_adjust(0.5, 0.25, {"3": 2.0, 7: -100}, vocab_size=10)
    logits = torch.arange(10, dtype=torch.float32)
    tokens = [1, 1, 3, 9, 1]
    expected = logits.clone()
    for token in set(tokens):
        expected[token] -= 0.25 * tokens.count(token) + 0.5
    expected[3] += 2.0
    expected[7] -= 100
    adjust.apply(logits, tokens)
    assert torch.equal(logits, expected)
    assert logit_adjust(0, 0.0, {}, 10) is None
    for bad in ({"presence_penalty": 2.5}, {"logit_bias": {"x": 1}},
                {"logit_bias": {"10": 1}}, {"logit_bias": {"1": 101}}):
        with pytest.raises(ArgumentValueError):
            logit_adjust(vocab_size=10, **bad)
