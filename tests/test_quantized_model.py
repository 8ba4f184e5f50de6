"""Quantized models end to end: built while loading, they compute what a float model of their
dequantized weights computes, split over processes like any model, and refuse what they
cannot do with errors that say so."""

import pytest
import torch

from llama.kernels import cpu_kernels
from llama.layers.linear import NATIVE_INT4_ROWS, PackedInt4, PackedInt8
from llama.model import Transformer
from llama.quantize.formats import QuantizationError, is_quantized, quantize
from tests.conftest import REPO, model_args, run_script, run_workers
from tests.test_generation import PROMPTS


def _tokens(bsz=2, seqlen=12, seed=0):
    return torch.randint(3, 1000, (bsz, seqlen), generator=torch.Generator().manual_seed(seed))


def _dequantized_model(checkpoints, kind, mode):
    """The float model whose weights are the quantized ones, dequantized: what a quantized
    model should compute, up to the bfloat16 activations its prefill products take."""
    state = {}
    for name, tensor in checkpoints.state(kind).items():
        if name == "rope.freqs":
            continue
        tensor = tensor.float()
        state[name] = quantize(tensor, mode).dequantize() if is_quantized(name) else tensor
    return Transformer.from_state_dict(model_args(kind, max_seq_len=64, max_batch_size=4), state)


def _relative(got, want):
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_a_quantized_model_computes_its_dequantized_weights(kind, mode, build, checkpoints):
    quantized = build(kind, quantize=mode).model
    layer = quantized.layers[0]
    packed = PackedInt8 if mode == "int8" else PackedInt4
    assert isinstance(layer.attention.wqkv, packed) and isinstance(layer.feed_forward.w2.weight,
                                                                   packed)
    assert layer.attention.wq.weight is None  # its rows live in the packed wqkv
    tokens = _tokens()
    expected = _dequantized_model(checkpoints, kind, mode).forward(tokens, 0)
    got = quantized.forward(tokens, 0)
    # 24 rows: our kernels (int16 activations) or the dequantised bfloat16 product (about 3
    # significant digits)
    assert _relative(got, expected) < 1e-2
    full = build(kind).model.forward(tokens, 0)
    # random Gaussian weights: 4 bits cost more than in a trained model (README)
    assert _relative(got, full) < (0.05 if mode == "int8" else 0.35)
    # the same logits through generation's cache and the decode steps, whose products of few
    # rows (here every one: 12 rows, then 2) take our native kernels where they build: int8
    # and int4 with activations rounded to int16 per row, 2^-16 of the row's largest (else
    # torch's kernels, bfloat16 activations, 2^-9 of each value)
    cache = quantized.new_cache(2, 16)
    prefill = quantized.forward(tokens[:, :6], 0, cache)
    steps = [quantized.forward(tokens[:, i:i + 1], i, cache) for i in range(6, 12)]
    assert _relative(torch.cat([prefill] + steps, 1), got) < 1e-2
    native = cpu_kernels.available() and 12 <= NATIVE_INT4_ROWS
    bound = 5e-4 if native else 1e-2
    assert _relative(torch.cat([prefill] + steps, 1), expected) < bound


def test_quantized_weights_take_less_memory(build):
    def projection_bytes(model):
        layer = model.layers[0]
        weights = [layer.attention.wqkv, layer.attention.wo.weight, layer.feed_forward.w13,
                   layer.feed_forward.w2.weight]
        return sum(w.nbytes if not isinstance(w, torch.Tensor) else w.numel() * w.element_size()
                   for w in weights)

    full = projection_bytes(build("mha").model)  # the checkpoint's bfloat16 (llama/layers/bf16.py)
    assert projection_bytes(build("mha", dtype=torch.float32).model) == 2 * full
    assert projection_bytes(build("mha", quantize="int8").model) < 0.6 * full
    assert projection_bytes(build("mha", quantize="int4").model) < 0.4 * full


@pytest.fixture(scope="module")
def two_process_runs(checkpoints, tokenizer_path, tmp_path_factory):
    """mp_worker's outputs for the 2-shard checkpoint quantized at load on 2 processes, by
    mode: one torchrun launch for both modes."""
    jobs = [dict(ckpt_dir=checkpoints("gqa", 2), tokenizer_path=tokenizer_path, device="cpu",
                 quantize=mode) for mode in ("int8", "int4")]
    return dict(zip(("int8", "int4"), run_workers(jobs, 2, tmp_path_factory.mktemp("two"))))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_two_processes_hold_the_scales_of_one(mode, two_process_runs, checkpoints,
                                              tokenizer_path, tmp_path):
    """Each rank quantizes its own slices; row-parallel weights keep whole-row scales (int8)
    or whole groups (int4), so two processes hold what one process does, and decode alike.
    Their sums are not bit-identical: a row-parallel product's partial sums come out of a
    prefill's bfloat16 product on each rank (and of every product's where our float32 native
    kernels are unavailable), so greedy paths may part where two candidates are within
    bfloat16's rounding (README). The first tokens agree, and their logprobs as
    closely as the float model's in bfloat16 on 1 and 2 processes (up to 0.06 apart here)."""
    one = run_workers([dict(ckpt_dir=checkpoints("gqa", 1), tokenizer_path=tokenizer_path,
                            quantize=mode)], None, tmp_path)[0]
    two = two_process_runs[mode]
    for a, b in zip(one["completions"], two["completions"]):
        assert a["tokens"][:8] == b["tokens"][:8]
        assert a["logprobs"][:8] == pytest.approx(b["logprobs"][:8], abs=0.1)


def test_row_parallel_slices_are_quantized_as_the_whole_matrix():
    """What each of two ranks computes while loading (its column slice of wo, with the
    all-reduced row maxima for int8) equals the same columns of the whole matrix quantized in
    one process: the same integers and the same scales."""
    from llama.quantize.formats import quantize_int8, row_absmax
    from llama.quantize.shards import narrow

    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    for mode in ("int8", "int4"):
        whole = quantize(weight, mode)
        halves = [weight[:, :64], weight[:, 64:]]
        absmax = torch.maximum(row_absmax(halves[0]), row_absmax(halves[1]))  # all_reduce MAX
        for rank, half in enumerate(halves):
            mine = quantize_int8(half, absmax) if mode == "int8" else quantize(half, mode)
            theirs = narrow(whole, 1, 64 * rank, 64)
            for key, tensor in mine.tensors().items():
                assert torch.equal(tensor, theirs.tensors()[key]), (mode, key)


def test_generation_and_metas_forward_on_a_quantized_model(build):
    generator = build("gqa", quantize="int8")
    prompt = generator.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    tokens, logprobs = generator.generate([prompt], 4, temperature=0, logprobs=True)
    # the model's own cache, Meta's way: the greedy tokens are the argmax of its logits
    logits = generator.model.forward(torch.tensor([prompt + tokens[0][:3]]), 0)
    assert logits[0, len(prompt) - 1:].argmax(-1).tolist() == tokens[0]
    expected = torch.log_softmax(logits[0, len(prompt) - 1:], -1).max(-1).values
    # our native kernel in both (any row count), else torch's kernels (bfloat16 activations).
    # The kernel rounds activations to int16 per row, so the float32 differences of a full
    # forward and a cached one can move a value by a rounding step (2^-16 of its row's
    # largest): ~1e-4 here
    tolerance = 1e-3 if cpu_kernels.available() else 0.05
    assert logprobs[0] == pytest.approx(expected.tolist(), abs=tolerance)


def test_bad_quantization_requests_say_what_works(build, checkpoints, tokenizer_path):
    from llama import Llama

    with pytest.raises(ValueError, match="quantize must be one of 'int8', 'int4'"):
        build("gqa", quantize="int3")
    with pytest.raises(ValueError, match="group_size must be one of"):
        build("gqa", quantize="int4", group_size=48)
    with pytest.raises(ValueError, match="group_size applies to quantize='int4' only"):
        build("gqa", quantize="int8", group_size=32)
    # dim 64: a group of 128 would straddle rows; the error names the tensor and what works
    with pytest.raises(QuantizationError, match=r"output.weight: 64 input columns are not a "
                                                r"multiple of the int4 group size 128; group "
                                                r"sizes that divide it: 32, 64"):
        Llama.build(checkpoints("gqa"), tokenizer_path, 64, 4, device="cpu", verbose=False,
                    quantize="int4", group_size=128)
    model = build("gqa", quantize="int4").model
    model.layers[0].attention.wq.register_forward_hook(lambda *args: None)
    with pytest.raises(QuantizationError, match="hook the Attention"):
        model.forward(_tokens(), 0)


def test_the_example_script_runs_quantized(checkpoints, tokenizer_path, build):
    result = run_script(["example_text_completion.py", "--ckpt_dir", checkpoints("gqa"),
                         "--tokenizer_path", tokenizer_path, "--temperature", "0",
                         "--max_gen_len", "8", "--quantize", "int8"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "int8 weights" in result.stderr
    expected = build("gqa", max_seq_len=128, quantize="int8").text_completion(
        ["I believe the meaning of life is"], temperature=0, max_gen_len=8)[0]["generation"]
    assert f"I believe the meaning of life is\n> {expected}\n" in result.stdout


def test_the_compiled_decode_step_takes_quantized_weights(build):
    generator = build("gqa", quantize="int8")
    eager = generator.text_completion(PROMPTS[:3], temperature=0, max_gen_len=6, logprobs=True)
    generator.compile_decode()
    compiled = generator.text_completion(PROMPTS[:3], temperature=0, max_gen_len=6,
                                         logprobs=True)
    assert [c["tokens"] for c in compiled] == [e["tokens"] for e in eager]
    # our native kernels are operators the compiled step calls as they are; the compiled
    # step's float32 differences can move an int16 rounding step, as above
    tolerance = 1e-3 if cpu_kernels.available() else 1e-2
    for c, e in zip(compiled, eager):
        assert c["logprobs"] == pytest.approx(e["logprobs"], abs=tolerance)


def test_the_chat_scripts_run_quantized(checkpoints, tokenizer_path, build):
    """example_chat_completion.py and the interactive chat with --quantize int4: the
    quantized model's answers (those of Llama.build(quantize="int4"))."""
    import os
    import sys

    from tests.test_examples import Terminal, _answer

    common = ["--ckpt_dir", checkpoints("gqa"), "--tokenizer_path", tokenizer_path,
              "--temperature", "0", "--max_gen_len", "8", "--quantize", "int4"]
    result = run_script(["example_chat_completion.py"] + common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "int4 weights" in result.stderr and result.stdout.count("> Assistant: ") == 4
    expected = build("gqa", max_seq_len=512, quantize="int4").chat_completion(
        [[{"role": "user", "content": "what is the recipe of mayonnaise?"}]],
        temperature=0, max_gen_len=8)[0]["generation"]["content"]
    assert f"> Assistant: {expected}\n" in result.stdout

    term = Terminal([sys.executable, "example_chat_interactive.py"] + common,
                    {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    term.expect("User: ")
    term.type("what is the recipe of mayonnaise?")
    term.expect("User: ", count=2)
    assert _answer(term.screen.split("Assistant: ")[1]) == expected.strip()
    term.type("/exit")
    term.expect("Bye.")
    assert term.close() == 0
