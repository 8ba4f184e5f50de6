"""A KV cache kept in bfloat16 under float32 activations (kv_cache_dtype): the kernel reads it as
the float32 values it holds, the model computes the reference's function with keys and values
rounded as they are cached, prefills and decode steps agree, and the cache takes half the
memory, counted before loading."""

import dataclasses

import pytest
import torch

from llama.checkpoints.memory import LLAMA2
from llama.checkpoints.memory_fit import GIB, check_fits, estimate
from llama.engine.validation import ArgumentTypeError, ArgumentValueError
from llama.kernels import cpu_kernels
from tests.meta_reference import ReferenceModel, reference_generate
from tests.test_generation import PROMPTS
from tests.test_memory_fit import only_the_limit, refusal

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler here")


@needs_kernels
@pytest.mark.parametrize("bsz, kv_heads, rep, head_dim, length", [
    (1, 4, 1, 64, 200), (3, 2, 4, 128, 77), (2, 2, 2, 24, 19)])
def test_the_kernel_reads_bfloat16_keys_and_values_as_their_float32_values(
        bsz, kv_heads, rep, head_dim, length):
    """Bit for bit the float32 kernel's result on the widened cache (strided views of a longer
    cache, rows over their own ranges; 24: a head size the vectorised loops do not cover)."""
    g = torch.Generator().manual_seed(length)
    cache_k, cache_v = (torch.randn(bsz, kv_heads, length + 9, head_dim, generator=g)
                        .to(torch.bfloat16) for _ in range(2))
    k, v = cache_k[:, :, :length], cache_v[:, :, :length]
    q = torch.randn(bsz, kv_heads, rep, head_dim, generator=g)
    starts = torch.randint(0, length // 2, (bsz,), generator=g)
    ends = torch.randint(length // 2 + 1, length + 1, (bsz,), generator=g)
    got = cpu_kernels.decode_attention(q, k, v, starts, ends, head_dim ** -0.5)
    want = cpu_kernels.decode_attention(q, k.float(), v.float(), starts, ends, head_dim ** -0.5)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        cpu_kernels.decode_attention(q, k, v.float(), starts, ends, 1.0)


@pytest.mark.parametrize("kind, route", [
    ("gqa", "torch"), pytest.param("gqa", "native", marks=needs_kernels), ("gqa", "compiled"),
    ("mha", "torch"), pytest.param("mha", "native", marks=needs_kernels)])
def test_greedy_tokens_and_logprobs_equal_the_reference_with_a_bfloat16_cache(
        kind, route, build, checkpoints):
    """Against the restated reference whose cache is bfloat16 too (a left-padded batch: rows of
    different lengths), by each route of the decode steps: the same tokens, logprobs within
    1e-2. Not the float32 cache's: on these random weights the rounding changes tokens, or
    logprobs by far more than that. (The tolerance: a key that float32's last bit puts on the
    other side of a bfloat16 rounding boundary moves by bfloat16's step, which has moved a
    logprob here by 3e-3.)"""
    generator = build(kind, kv_cache_dtype="bfloat16")
    if route == "native":  # our kernels: decode attention reads the bfloat16 cache itself
        generator.model.use_native_kernels()
    elif route == "compiled":  # torch's attention over the widened cache, compiled
        generator.compile_decode()
    prompts = [generator.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    tokens, logprobs = generator.generate(prompts, max_gen_len=16, temperature=0, logprobs=True)
    state, params = checkpoints.state(kind), checkpoints.params(kind)
    eos = generator.tokenizer.eos_id
    want = reference_generate(ReferenceModel(state, params, 4, 64, torch.bfloat16), prompts, 16,
                              eos, True)
    assert tokens == want[0]
    assert _largest_difference(logprobs, want[1]) < 1e-2
    plain = reference_generate(ReferenceModel(state, params, 4, 64), prompts, 16, eos, True)
    assert plain[0] != tokens or _largest_difference(plain[1], logprobs) > 0.1


def _largest_difference(got, want) -> float:
    assert [len(row) for row in got] == [len(row) for row in want]
    return max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))


@needs_kernels
def test_a_bfloat16_cache_takes_our_kernel_even_where_float32_keeps_torchs(build, monkeypatch):
    """Where our kernel is not the faster for a float32 cache (a plain C++ build: faked here),
    a bfloat16 one still takes it: torch's attention would need the cache widened each step."""
    monkeypatch.setattr(cpu_kernels, "fast_attention", lambda: False)
    for kv_cache_dtype, kernel in ((None, False), ("bfloat16", True)):
        generator = build("gqa", kv_cache_dtype=kv_cache_dtype)
        assert not generator.model.native_attention
        prompt = [generator.tokenizer.encode("The meaning of life", bos=True, eos=False)]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            generator.generate(prompt, 4, temperature=0)
        ran = {event.key for event in prof.key_averages()}
        assert ("llama_kernels::decode_attention" in ran) == kernel, kv_cache_dtype


def test_the_cache_is_half_the_bytes_and_meta_calls_use_it(build):
    """new_cache (generation, sessions, the server) and the modules' own cache (Meta's
    forward(tokens, start_pos)) keep bfloat16; None keeps the activations' float32."""
    rounded, plain = build("gqa", kv_cache_dtype=torch.bfloat16), build("gqa")
    assert rounded.model.kv_cache_dtype == torch.bfloat16 and plain.model.kv_cache_dtype is None
    half, full = rounded.model.new_cache(2, 32), plain.model.new_cache(2, 32)
    assert half.k[0].dtype == torch.bfloat16 and full.k[0].dtype == torch.float32
    assert 2 * half.nbytes == full.nbytes
    tokens = torch.tensor([rounded.tokenizer.encode("The meaning of life", bos=True, eos=False)])
    whole = rounded.model(tokens, 0)
    attention = rounded.model.layers[0].attention
    assert attention.cache_k.dtype == torch.bfloat16
    # the last token fed alone after the others, from the module's own cache
    rounded.model(tokens[:, :-1], 0)
    last = rounded.model(tokens[:, -1:], tokens.shape[1] - 1)
    torch.testing.assert_close(last[0, -1], whole[0, -1], rtol=1e-4, atol=1e-4)


def test_a_prefix_cache_answers_alike_with_a_bfloat16_cache(build):
    from llama.engine.prefix_cache import PrefixCache
    from tests.test_prefix_cache import _chat_turns, _engine, _serve

    generator = build("gqa", max_seq_len=160, max_batch_size=2, kv_cache_dtype="bfloat16")
    groups = _chat_turns(generator, 8)
    expected = _serve(_engine(generator, None, chunk=5), groups, 8)
    prefixes = PrefixCache(capacity=64, block_size=4)
    assert _serve(_engine(generator, prefixes, chunk=5), groups, 8) == expected
    assert prefixes.hits >= 4


def test_the_memory_check_counts_a_bfloat16_cache_and_offers_it(monkeypatch):
    """Half the cache in the estimate; a build that a float32 cache does not fit but a
    bfloat16 one does is refused naming --kv_cache_dtype bfloat16 with its size."""
    args = dataclasses.replace(LLAMA2["7B"], max_seq_len=4096, max_batch_size=4)
    full = estimate(args, 1, "int4", 32, torch.bfloat16, torch.float32)
    half = estimate(args, 1, "int4", 32, torch.bfloat16, torch.float32, torch.bfloat16)
    assert full.cache == 4 * 4096 * 32 * 2 * 4096 * 4 == 2 * half.cache
    assert half.weights == full.weights and half.working > full.working
    only_the_limit(monkeypatch, str((half.total + full.total) // 2))
    message = refusal(args, "int4", 32)
    assert f"KV cache {full.cache / GIB:.1f} GiB float32 for max_batch_size 4" in message
    assert f"--kv_cache_dtype bfloat16: {half.total / GIB:.1f} GiB" in message
    check_fits(args, 1, "int4", 32, torch.bfloat16, torch.float32, torch.device("cpu"),
               bf16_checkpoint=True, cache_dtype=torch.bfloat16)


def test_a_16_gib_laptop_is_offered_the_whole_context_quantized_with_a_bfloat16_cache(
        monkeypatch):
    """The server's defaults (4 x 2048) for 7B where 14 GiB is free: int8 or int4 weights with
    a bfloat16 cache keep the whole context, offered before a shorter one."""
    only_the_limit(monkeypatch, "14GiB")
    args = dataclasses.replace(LLAMA2["7B"], max_seq_len=2048, max_batch_size=4)
    message = refusal(args)
    int8 = estimate(args, 1, "int8", None, torch.bfloat16, torch.float32, torch.bfloat16)
    assert f"settings that fit: --quantize int8 --kv_cache_dtype bfloat16: " \
           f"{int8.total / GIB:.1f} GiB; --quantize int4 --kv_cache_dtype bfloat16: " in message
    assert "--quantize int8 --max_seq_len" not in message
    assert estimate(args, 1, "int8", None, torch.bfloat16, torch.float32).total > 14 * GIB


def test_bad_values_are_refused_before_loading(build):
    with pytest.raises(ArgumentValueError, match="kv_cache_dtype 'float16' is not supported; "
                                                 "use bfloat16 or float32"):
        build("gqa", kv_cache_dtype="float16")
    with pytest.raises(ArgumentTypeError, match="kv_cache_dtype must be a str"):
        build("gqa", kv_cache_dtype=16)


def test_the_scripts_take_the_flag(checkpoints, tokenizer_path):
    from tests.conftest import run_script

    script = ["example_text_completion.py", "--ckpt_dir", checkpoints("gqa", 1),
              "--tokenizer_path", tokenizer_path, "--max_seq_len", "128", "--max_gen_len", "4"]
    result = run_script(script + ["--kv_cache_dtype", "bfloat16"])
    assert result.returncode == 0, result.stderr
    assert "GiB bfloat16 (max_batch_size 4 x max_seq_len 128)" in result.stderr  # the log
    assert ", bfloat16 KV cache)" in result.stderr and result.stdout.count("\n> ") == 4
    result = run_script(script + ["--kv_cache_dtype", "float16"])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --kv_cache_dtype 'float16' is not supported; use bfloat16 or float32 (or leave "
        "it out: the activations' dtype)")
