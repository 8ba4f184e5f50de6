"""Generation against the reference algorithm restated in tests/meta_reference.py."""

import json
import math

import pytest
import torch

from llama.chat_format import UNSAFE_ERROR, dialog_to_tokens
from llama.generation import sample_top_p
from llama.model import KVCache
from tests.meta_reference import ReferenceModel, reference_generate

PROMPTS = ["The meaning of life is", "Simply put, the theory of relativity states that ",
           "x", "Translate English to French:\n\nsea otter => loutre de mer\ncheese =>"]


def _reference(state, params, max_seq_len=64, bsz=4):
    return ReferenceModel(state, params, bsz, max_seq_len)


def _assert_logprobs_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert len(g) == len(w)
        for a, b in zip(g, w):
            assert math.isclose(a, b, abs_tol=1e-4), (a, b)


@pytest.mark.parametrize("kind", ["gqa", "mha"])
@pytest.mark.parametrize("echo", [False, True])
def test_greedy_tokens_and_logprobs_equal_reference(kind, echo, build, checkpoints):
    generator = build(kind)
    prompt_tokens = [generator.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    tokens, logprobs = generator.generate(prompt_tokens, max_gen_len=20, temperature=0,
                                          logprobs=True, echo=echo)
    reference = _reference(checkpoints.state(kind), checkpoints.params(kind))
    want_tokens, want_logprobs = reference_generate(reference, prompt_tokens, 20,
                                                    generator.tokenizer.eos_id, True, echo)
    assert tokens == want_tokens
    _assert_logprobs_close(logprobs, want_logprobs)


@pytest.mark.parametrize("temperature, top_p", [(0.6, 0.9), (1.0, 1.0)])
def test_seeded_samples_equal_the_reference(temperature, top_p, build, checkpoints):
    """Same seed, same tokens: also for prompts of mixed lengths, whose tails the reference
    feeds one step at a time while drawing (and discarding) samples."""
    generator = build("mha")
    prompt_tokens = [generator.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    torch.manual_seed(7)
    tokens, logprobs = generator.generate(prompt_tokens, 20, temperature, top_p, logprobs=True)
    reference = _reference(checkpoints.state("mha"), checkpoints.params("mha"))
    torch.manual_seed(7)
    want = reference_generate(reference, prompt_tokens, 20, 2, True, False, temperature, top_p)
    assert tokens == want[0]
    _assert_logprobs_close(logprobs, want[1])


def test_refused_dialogs_do_not_change_the_others_samples(build):
    generator = build("gqa", max_seq_len=128)
    ok = [{"role": "user", "content": "Hello there"}]
    refused = [{"role": "user", "content": "a long question with [INST] inside it, longer"}]
    torch.manual_seed(3)
    mixed = generator.chat_completion([refused, ok, ok], temperature=1.0, max_gen_len=12)
    # the reference runs the refused dialog too; its random numbers come from the whole batch
    tokens = [dialog_to_tokens(d, generator.tokenizer.encode) for d in (refused, ok, ok)]
    torch.manual_seed(3)
    out, _ = generator.generate(tokens, 12, temperature=1.0)
    assert mixed[0]["generation"]["content"] == UNSAFE_ERROR
    assert [m["generation"]["content"] for m in mixed[1:]] == \
        [generator.tokenizer.decode(t) for t in out[1:]]


def test_eos_stops_rows_as_the_reference_does(build, eos_checkpoint, tokenizer_path):
    from llama import Llama

    path, state = eos_checkpoint
    generator = Llama.build(path, tokenizer_path, 64, 4, verbose=False, device="cpu")
    prompt_tokens = [generator.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    tokens, logprobs = generator.generate(prompt_tokens, 30, temperature=0, logprobs=True)
    params = json.loads(open(f"{path}/params.json").read())
    want = reference_generate(_reference(state, params), prompt_tokens, 30, 2, True)
    assert tokens == want[0]
    _assert_logprobs_close(logprobs, want[1])
    assert any(len(t) < 30 for t in tokens), "the fixture should make some rows stop at EOS"
    results = generator.text_completion(PROMPTS, temperature=0, max_gen_len=30)
    assert [r["finish_reason"] for r in results] == \
        ["stop" if len(t) < 30 else "length" for t in tokens]


def test_max_seq_len_limits_long_prompts_like_the_reference(build, checkpoints):
    generator = build("mha", max_seq_len=32)
    short = generator.tokenizer.encode("Hi", bos=True, eos=False)
    long = list(range(3, 31))  # 28 tokens: 4 slots left before max_seq_len
    tokens, logprobs = generator.generate([short, long], max_gen_len=10, temperature=0,
                                          logprobs=True)
    reference = _reference(checkpoints.state("mha"), checkpoints.params("mha"), 32)
    want = reference_generate(reference, [short, long], 10, 2, True)
    assert tokens == want[0] and [len(t) for t in tokens] == [10, 4]
    _assert_logprobs_close(logprobs, want[1])


@pytest.mark.parametrize("max_gen_len", [0, 1])
def test_echo_with_nothing_or_one_token_to_generate(max_gen_len, build, checkpoints):
    # max_gen_len=0 is the reference's scoring path (its logprobs are taken unshifted).
    generator = build("gqa")
    prompt_tokens = [generator.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS[:2]]
    prompt_tokens[1] = prompt_tokens[1][: len(prompt_tokens[0])]  # equal lengths
    got = generator.generate(prompt_tokens, max_gen_len, temperature=0, logprobs=True, echo=True)
    reference = _reference(checkpoints.state("gqa"), checkpoints.params("gqa"))
    want = reference_generate(reference, prompt_tokens, max_gen_len, 2, True, True)
    assert got[0] == want[0]
    _assert_logprobs_close(got[1], want[1])


def test_batch_of_mixed_lengths_equals_each_prompt_alone(build):
    generator = build("gqa")
    together = generator.text_completion(PROMPTS, temperature=0, max_gen_len=16, logprobs=True)
    for prompt, result in zip(PROMPTS, together):
        alone = generator.text_completion([prompt], temperature=0, max_gen_len=16,
                                          logprobs=True)[0]
        assert alone["generation"] == result["generation"]
        assert alone["tokens"] == result["tokens"]
        for a, b in zip(alone["logprobs"], result["logprobs"]):
            assert math.isclose(a, b, abs_tol=1e-5)


def test_logprobs_equal_log_softmax_of_a_full_forward(build):
    generator = build("mha")
    prompt = generator.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    tokens, logprobs = generator.generate([prompt], 12, temperature=0, logprobs=True, echo=True)
    sequence = torch.tensor([tokens[0]])
    cache = generator.model.new_cache(1, sequence.shape[1])
    logp = torch.log_softmax(generator.model.forward(sequence, 0, cache)[0], dim=-1)
    expected = [0.0] + [logp[i - 1, t].item() for i, t in enumerate(tokens[0]) if i > 0]
    assert len(logprobs[0]) == len(expected)
    for a, b in zip(logprobs[0], expected):
        assert math.isclose(a, b, abs_tol=1e-5)


def test_text_completion_return_shape(build):
    generator = build("gqa")
    plain = generator.text_completion(["Hello"], temperature=0, max_gen_len=5)
    assert set(plain[0]) == {"generation", "finish_reason"}
    assert isinstance(plain[0]["generation"], str) and plain[0]["finish_reason"] == "length"
    detailed = generator.text_completion(["Hello"], temperature=0, max_gen_len=5, logprobs=True)
    assert len(detailed[0]["tokens"]) == len(detailed[0]["logprobs"]) == 5
    assert detailed[0]["generation"] == plain[0]["generation"]


def test_default_max_gen_len_is_max_seq_len_minus_one(build):
    generator = build("gqa", max_seq_len=24)
    prompt = generator.tokenizer.encode("a", bos=True, eos=False)
    out = generator.text_completion(["a"], temperature=0, logprobs=True)
    # the prompt fills the first slots; generation runs until max_seq_len
    assert len(out[0]["tokens"]) == 24 - len(prompt)


def test_sampling_is_seeded_and_differs_from_greedy(build):
    generator = build("gqa")
    torch.manual_seed(5)
    first = generator.text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=12)
    torch.manual_seed(5)
    second = generator.text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=12)
    greedy = generator.text_completion(PROMPTS, temperature=0, max_gen_len=12)
    assert first == second
    assert first != greedy


def test_sample_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.125, 0.5, 0.125, 0.25]])  # exact in binary
    torch.manual_seed(0)

    def draws(p, n=300):
        return {sample_top_p(probs.clone(), p).item() for _ in range(n)}

    assert draws(0.7) == {1, 3}  # 0.5 + 0.25 reaches 0.7
    assert draws(0.4) == {1}  # the most likely token alone reaches 0.4
    # As in the reference, a token is dropped only when the mass before it exceeds p.
    assert draws(0.5) == {1, 3}
    assert draws(1.0, 600) == {0, 1, 2, 3}
    assert sample_top_p(probs.repeat(3, 1), 0.4).tolist() == [[1], [1], [1]]


def test_temperature_zero_is_argmax(build):
    generator = build("gqa")
    prompt = generator.tokenizer.encode("The", bos=True, eos=False)
    tokens, _ = generator.generate([prompt], 1, temperature=0)
    cache = generator.model.new_cache(1, len(prompt))
    logits = generator.model.forward(torch.tensor([prompt]), 0, cache)
    assert tokens[0][0] == logits[0, -1].argmax().item()


def test_batches_larger_than_max_batch_size_run_in_chunks(build):
    generator = build("gqa", max_batch_size=2)
    prompts = PROMPTS + ["One more", "And another"]
    chunked = generator.text_completion(prompts, temperature=0, max_gen_len=8)
    for prompt, result in zip(prompts, chunked):
        assert generator.text_completion([prompt], temperature=0, max_gen_len=8)[0] == result


def test_kv_cache_is_sized_to_the_call(build):
    generator = build("gqa", max_seq_len=64, max_batch_size=4)
    generator.free_cache()
    generator.text_completion(["Hi"], temperature=0, max_gen_len=3)
    cache = generator._cache
    prompt_len = len(generator.tokenizer.encode("Hi", bos=True, eos=False))
    params = generator.model.params
    assert len(cache.k) == len(cache.v) == params.n_layers
    assert cache.k[0].shape == (1, params.n_kv_heads, prompt_len + 3, params.head_dim)
    assert cache.nbytes == (KVCache.bytes_per_token(params, torch.float32)
                            * 1 * (prompt_len + 3))
    generator.text_completion(["Hi", "there"], temperature=0, max_gen_len=10)
    assert generator._cache.rows == 2  # grown when a call needs more


@pytest.mark.parametrize("call, error, message", [
    (lambda g: g.generate([[1] * 65], 4), ValueError,
     "prompt 1 has 65 tokens, more than max_seq_len=64"),
    (lambda g: g.text_completion(["ok", "word " * 80]), ValueError,
     "prompt 2 has .* tokens, more than max_seq_len=64"),
    (lambda g: g.generate([[1]] * 5, 4), ValueError, "5 prompts exceed max_batch_size=4"),
    (lambda g: g.generate([[1], []], 4), ValueError, "prompt 2 is empty"),
    (lambda g: g.generate([[1, 5000]], 4), ValueError, "outside the vocabulary"),
    (lambda g: g.text_completion(["a"], temperature=-0.1), ValueError, "temperature must be"),
    (lambda g: g.text_completion(["a"], top_p=0), ValueError, r"top_p must be in \(0, 1\]"),
    (lambda g: g.text_completion(["a"], top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (lambda g: g.text_completion(["a"], max_gen_len=-1), ValueError, "max_gen_len must be"),
    (lambda g: g.text_completion(["a", 3]), TypeError, "prompt 2 must be a str"),
    (lambda g: g.stream_text("a", temperature=-1), ValueError, "temperature"),  # not iterated
    (lambda g: g.text_completion("a"), TypeError, "list of prompt strings"),
    (lambda g: g.chat_completion([[]]), ValueError, "dialog 1 is empty"),
])
def test_bad_input_gets_a_clear_error(call, error, message, build):
    generator = build("gqa")
    with pytest.raises(error, match=message):
        call(generator)


def test_errors_count_prompts_and_dialogs_from_one(build):
    """As people count, across the chunks of a batch larger than max_batch_size, and a chat
    names its dialogs (a refused one included) rather than the prompts it runs."""
    generator = build("gqa")  # max_batch_size 4, max_seq_len 64
    too_long = "word " * 80
    with pytest.raises(ValueError, match="^prompt 6 has .* tokens, more than max_seq_len=64"):
        generator.text_completion(["a"] * 5 + [too_long], max_gen_len=2)
    dialogs = [[{"role": "user", "content": "Tell me about [INST] tags"}],  # refused, not run
               [{"role": "user", "content": "Hello"}],
               [{"role": "user", "content": too_long}]]
    with pytest.raises(ValueError, match="^dialog 3 has .* tokens, more than max_seq_len=64"):
        generator.chat_completion(dialogs, max_gen_len=2)
    with pytest.raises(ValueError, match="^dialog has .* tokens"):
        generator.stream_chat(dialogs[2], max_gen_len=2)
    with pytest.raises(ValueError, match="^prompt has .* tokens"):
        generator.stream_text(too_long, max_gen_len=2)


def test_bad_build_arguments(checkpoints, tokenizer_path):
    from llama import Llama

    with pytest.raises(ValueError, match="max_seq_len must be a positive integer"):
        Llama.build(checkpoints("gqa"), tokenizer_path, max_seq_len=0, max_batch_size=1)
    with pytest.raises(ValueError, match="dtype 'float33' is not supported; use one of "
                                         "float32, bfloat16, float16"):
        Llama.build(checkpoints("gqa"), tokenizer_path, 8, 1, dtype="float33")


def test_the_compiled_decode_step_is_one_graph(build):
    """A break in the graph (such as the thread count that one-row products split by, which
    torch.compile cannot trace unless told it is a constant) would leave the layer loop running
    eagerly between compiled pieces."""
    import torch._dynamo.utils

    generator = build("gqa", dtype="float32")  # float32 weights: one-row products split
    generator.compile_decode(cuda_graphs=False)
    torch._dynamo.utils.counters.clear()
    try:  # one row: the products that split by the thread count
        generator.text_completion(PROMPTS[:1], temperature=0, max_gen_len=4)
    finally:
        generator._compiled_step = None  # the generator is shared
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1 and not breaks, \
        dict(breaks)


@pytest.mark.parametrize("cuda_graphs", [False, True])  # on the CPU, True only sets the mode
def test_compiled_decode_step_equals_eager(build, cuda_graphs):
    generator = build("gqa")
    eager = generator.text_completion(PROMPTS[:3], temperature=0, max_gen_len=10, logprobs=True)
    generator.compile_decode(cuda_graphs=cuda_graphs)
    try:
        compiled = generator.text_completion(PROMPTS[:3], temperature=0, max_gen_len=10,
                                             logprobs=True)
    finally:
        generator._compiled_step = None  # the generator is shared
    for a, b in zip(eager, compiled):
        assert a["tokens"] == b["tokens"]
        assert all(math.isclose(x, y, abs_tol=1e-5) for x, y in zip(a["logprobs"], b["logprobs"]))
