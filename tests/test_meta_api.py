"""Code written against Meta's original runs unchanged: the model called directly with
forward(tokens, start_pos), the model treated as an ordinary nn.Module, the names such code
imports, and scripts shaped like the original's examples, on one process and two."""

import copy
import re

import pytest
import torch
from torch import nn

from llama import Llama
from tests.conftest import REPO, run_script
from tests.meta_reference import ReferenceModel

# float32 summation order differs between the paths compared; a wrong cache slot, weight or
# position is off by far more
CLOSE = dict(atol=5e-5, rtol=1e-5)


@pytest.fixture
def generator(build):
    return build("gqa", max_seq_len=64, max_batch_size=4)


def _tokens(bsz=2, seqlen=20, seed=0):
    return torch.randint(3, 1000, (bsz, seqlen), generator=torch.Generator().manual_seed(seed))


def _reference(checkpoints, kind="gqa", state=None):
    return ReferenceModel(state if state is not None else checkpoints.state(kind),
                          checkpoints.params(kind), 4, 64)


def test_scoring_with_forward_tokens_0_equals_the_reference(generator, checkpoints):
    tokens = _tokens()
    logits = generator.model.forward(tokens, 0)
    assert logits.dtype == torch.float32 and logits.shape == (2, 20, 1000)
    torch.testing.assert_close(logits, _reference(checkpoints).forward(tokens, 0),
                               atol=1e-5, rtol=1e-5)


def test_chunks_and_single_tokens_continue_one_sequence(generator, checkpoints):
    tokens = _tokens(seqlen=24, seed=1)
    reference = _reference(checkpoints)
    full = reference.forward(tokens, 0)
    # a chunk, one-token steps, another chunk: each call continues from the last
    pieces = [(0, 9), (9, 10), (10, 11), (11, 18), (18, 24)]
    got = torch.cat([generator.model.forward(tokens[:, a:b], a) for a, b in pieces], dim=1)
    torch.testing.assert_close(got, full, **CLOSE)
    # the reference restated, fed the same way, agrees step by step too
    again = torch.cat([reference.forward(tokens[:, a:b], a) for a, b in pieces], dim=1)
    torch.testing.assert_close(got, again, **CLOSE)


def test_the_models_cache_is_the_references_cache_k(generator):
    attention = generator.model.layers[0].attention
    assert attention.cache_k.shape == (4, 64, attention.n_local_kv_heads, attention.head_dim)
    generator.model.forward(_tokens(bsz=1, seqlen=5), 0)
    # the keys of the 5 positions were written, nothing after them
    assert attention.cache_k[0, :5].abs().sum() > 0 and attention.cache_k[0, 5:].abs().sum() == 0
    # it grows beyond max_batch_size x max_seq_len when a call needs more
    generator.model.forward(_tokens(bsz=6, seqlen=70), 0)
    assert attention.cache_k.shape[:2] == (6, 70)
    generator.free_cache()


def test_forward_and_generation_do_not_interfere(generator, checkpoints):
    prompts = ["The meaning of life is", "x = 1"]
    before = generator.text_completion(prompts, temperature=0, max_gen_len=10, logprobs=True)
    tokens = _tokens(bsz=1, seqlen=16, seed=2)
    first = generator.model.forward(tokens[:, :8], 0)
    between = generator.text_completion(prompts, temperature=0, max_gen_len=10, logprobs=True)
    second = generator.model.forward(tokens[:, 8:], 8)
    assert between == before
    full = _reference(checkpoints).forward(tokens, 0)
    torch.testing.assert_close(torch.cat([first, second], 1), full, **CLOSE)
    assert generator.text_completion(prompts, temperature=0, max_gen_len=10,
                                     logprobs=True) == before


def test_names_client_code_imports():
    from llama import Dialog, ModelArgs, Tokenizer, Transformer  # noqa: F401
    from llama.generation import (  # noqa: F401
        B_INST,
        B_SYS,
        E_INST,
        E_SYS,
        SPECIAL_TAGS,
        UNSAFE_ERROR,
        ChatPrediction,
        CompletionPrediction,
        Message,
        Role,
        sample_top_p,
    )
    from llama.model import (  # noqa: F401
        Attention,
        FeedForward,
        RMSNorm,
        TransformerBlock,
        apply_rotary_emb,
        precompute_freqs_cis,
        repeat_kv,
        reshape_for_broadcast,
    )

    assert (B_INST, E_INST) == ("[INST]", "[/INST]")
    assert (B_SYS, E_SYS) == ("<<SYS>>\n", "\n<</SYS>>\n\n")
    assert SPECIAL_TAGS == [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
    assert UNSAFE_ERROR == "Error: special tags are not allowed as part of the prompt."


def test_model_args_keep_metas_positional_order():
    from llama.model import ModelArgs

    # Meta's field order: dim, n_layers, n_heads, n_kv_heads, vocab_size, multiple_of,
    # ffn_dim_multiplier, norm_eps, max_batch_size, max_seq_len
    args = ModelArgs(64, 2, 4, 2, 1000, 32, 1.5, 1e-6, 3, 128)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size,
            args.multiple_of, args.ffn_dim_multiplier, args.norm_eps, args.max_batch_size,
            args.max_seq_len) == (64, 2, 4, 2, 1000, 32, 1.5, 1e-6, 3, 128)
    assert args.rope_theta == 10000.0


def test_model_helpers_behave_as_the_references(generator):
    from llama.model import (
        FeedForward,
        apply_rotary_emb,
        precompute_freqs_cis,
        repeat_kv,
        reshape_for_broadcast,
    )

    freqs = precompute_freqs_cis(16, 10)[3:7]  # Meta's 2-D (seqlen, head_dim // 2)
    xq, xk = torch.randn(2, 4, 3, 16), torch.randn(2, 4, 1, 16)
    q, k = apply_rotary_emb(xq, xk, freqs)
    # the reference's arithmetic, written out: complex pairs times the broadcast angles
    xq_ = torch.view_as_complex(xq.reshape(2, 4, 3, 8, 2))
    expected = torch.view_as_real(xq_ * reshape_for_broadcast(freqs, xq_)).flatten(3)
    torch.testing.assert_close(q, expected)
    assert k.shape == xk.shape
    kv = torch.randn(2, 5, 2, 8)
    torch.testing.assert_close(repeat_kv(kv, 3), torch.repeat_interleave(kv, 3, dim=2))
    with pytest.raises(ValueError, match="expected"):
        reshape_for_broadcast(freqs[:2], xq_)
    ff = FeedForward(dim=4096, hidden_dim=4 * 4096, multiple_of=256, ffn_dim_multiplier=None)
    assert ff.w1.weight.shape == (11008, 4096)  # 7B's


def test_llama_build_positional_arguments_and_tokenizer(checkpoints, tokenizer_path):
    generator = Llama.build(checkpoints("gqa"), tokenizer_path, 64, 4, None, 1, verbose=False,
                            device="cpu")
    assert generator.model.params.max_seq_len == 64
    assert generator.model.params.max_batch_size == 4
    tokenizer = generator.tokenizer
    assert (tokenizer.n_words, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == \
        (1000, 1, 2, -1)
    assert tokenizer.sp_model.vocab_size() == tokenizer.n_words


def test_parameters_require_grad_as_in_the_original(generator):
    params = list(generator.model.parameters())
    assert len(params) == 3 + 9 * generator.model.n_layers
    assert all(p.requires_grad for p in params)


def _edited(checkpoints, edit):
    state = {k: v.float().clone() for k, v in checkpoints.state("gqa").items()}
    edit(state)
    return state


def test_weight_edits_are_used_by_forward(build, checkpoints):
    """w.data = ..., a new Parameter, load_state_dict (copying and assigning): forward uses
    what the module then holds (the fused q/k/v and w1/w3 products follow). In float32: a
    default CPU model stores the checkpoint's bfloat16, and copying float32 values into it
    rounds them, as for any bfloat16 module (tests/test_bf16.py)."""
    tokens = _tokens(bsz=1, seqlen=12, seed=3)
    model = build("gqa", dtype=torch.float32).model
    model.forward(tokens, 0)  # the fused products laid out before the edits
    g = torch.Generator().manual_seed(9)
    new_wq = torch.randn(64, 64, generator=g) * 0.1
    new_w3 = torch.randn(192, 64, generator=g) * 0.1
    new_wk = torch.randn(32, 64, generator=g) * 0.1

    model.layers[0].attention.wq.weight.data = new_wq.clone()
    model.layers[1].feed_forward.w3.weight = nn.Parameter(new_w3.clone())
    expected = _reference(checkpoints, state=_edited(checkpoints, lambda s: s.update({
        "layers.0.attention.wq.weight": new_wq, "layers.1.feed_forward.w3.weight": new_w3})))
    torch.testing.assert_close(model.forward(tokens, 0), expected.forward(tokens, 0),
                               **CLOSE)

    edited = _edited(checkpoints, lambda s: s.update({"layers.1.attention.wk.weight": new_wk}))
    edited.pop("rope.freqs")
    for assign in (False, True):
        model = build("gqa", dtype=torch.float32).model
        model.forward(tokens, 0)
        model.load_state_dict({k: v.clone() for k, v in edited.items()}, assign=assign)
        torch.testing.assert_close(model.forward(tokens, 0),
                                   _reference(checkpoints, state=edited).forward(tokens, 0),
                                   **CLOSE)


def test_a_deep_copy_is_a_separate_model(build, checkpoints):
    tokens = _tokens(bsz=1, seqlen=10, seed=4)
    model = build("gqa").model
    before = model.forward(tokens, 0)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin.forward(tokens, 0), before, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        twin.layers[0].feed_forward.w1.weight.mul_(0.5)  # in place, on the copy only
    half_w1 = _edited(checkpoints, lambda s: s["layers.0.feed_forward.w1.weight"].mul_(0.5))
    torch.testing.assert_close(twin.forward(tokens, 0),
                               _reference(checkpoints, state=half_w1).forward(tokens, 0),
                               **CLOSE)
    torch.testing.assert_close(model.forward(tokens, 0), before, atol=1e-6, rtol=1e-6)


def test_half_and_to_dtype_equal_a_model_built_in_that_dtype(build):
    tokens = _tokens(bsz=2, seqlen=12, seed=5)
    for convert, dtype in ((lambda m: m.half(), torch.float16),
                           (lambda m: m.to(torch.bfloat16), torch.bfloat16)):
        model = build("gqa").model
        model.forward(tokens, 0)  # its cache follows the conversion
        convert(model)
        assert all(p.dtype == dtype for p in model.parameters())
        built = build("gqa", dtype=dtype).model
        torch.testing.assert_close(model.forward(tokens, 0), built.forward(tokens, 0),
                                   atol=0, rtol=0)
        assert model.layers[0].attention.cache_k.dtype == dtype


def test_hooks_see_metas_shapes_and_projection_hooks_fire(build, checkpoints):
    model = build("gqa").model
    tokens = _tokens(bsz=2, seqlen=7, seed=6)
    plain = model.forward(tokens, 0)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = (tuple(inputs[0].shape), tuple(output.shape))
        return hook

    handles = [model.layers[1].register_forward_hook(record("layer")),
               model.layers[0].attention.wq.register_forward_hook(record("wq")),
               model.layers[0].feed_forward.w1.register_forward_hook(record("w1")),
               model.output.register_forward_hook(record("output")),
               model.tok_embeddings.register_forward_hook(record("embeddings"))]
    torch.testing.assert_close(model.forward(tokens, 0), plain, **CLOSE)
    assert seen == {"layer": ((2, 7, 64), (2, 7, 64)), "wq": ((2, 7, 64), (2, 7, 64)),
                    "w1": ((2, 7, 64), (2, 7, 192)), "output": ((2, 7, 64), (2, 7, 1000)),
                    "embeddings": ((2, 7), (2, 7, 64))}
    for handle in handles:
        handle.remove()
    # a hook that changes an output (an ablation) changes the logits as the math says
    handle = model.layers[0].feed_forward.w2.register_forward_hook(
        lambda module, inputs, output: torch.zeros_like(output))
    no_w2 = _edited(checkpoints, lambda s: s["layers.0.feed_forward.w2.weight"].zero_())
    torch.testing.assert_close(model.forward(tokens, 0),
                               _reference(checkpoints, state=no_w2).forward(tokens, 0),
                               **CLOSE)
    handle.remove()
    torch.testing.assert_close(model.forward(tokens, 0), plain, **CLOSE)


def test_metas_own_build_path_transformer_and_load_state_dict(generator, checkpoints):
    """Meta's Llama.build: Transformer(model_args), then load_state_dict(checkpoint,
    strict=False) (rope.freqs is the checkpoint's extra)."""
    from llama.model import ModelArgs, Transformer

    args = ModelArgs(max_seq_len=64, max_batch_size=4, **checkpoints.params("gqa"))
    args.vocab_size = 1000
    model = Transformer(args)
    result = model.load_state_dict(torch.load(f"{checkpoints('gqa')}/consolidated.00.pth"),
                                   strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["rope.freqs"]
    model.float()
    tokens = _tokens(seed=7)
    torch.testing.assert_close(model.forward(tokens, 0), generator.model.forward(tokens, 0),
                               **CLOSE)


def _run_client(checkpoints, tokenizer_path, n_shards, nproc):
    result = run_script([str(REPO / "tests" / "meta_client.py"), checkpoints("gqa", n_shards),
                         tokenizer_path], nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.count("==================================") == 4  # one block per prompt
    assert out.count("score ") == 1
    assert float(out.split("chunked max diff ")[1].split()[0]) < 1e-4
    return out


@pytest.fixture(scope="module")
def client_on_one_process(checkpoints, tokenizer_path):
    return _run_client(checkpoints, tokenizer_path, 1, None)


def test_a_script_written_for_the_original_runs_as_it_did(client_on_one_process, generator):
    prompts = ["I believe the meaning of life is", "Simply put, the theory of relativity ",
               "A brief message congratulating the team", "Translate English to French:"]
    results = generator.text_completion(prompts, temperature=0, max_gen_len=8)
    expected = "".join(f"{p}\n> {r['generation']}\n\n==================================\n\n"
                       for p, r in zip(prompts, results))
    assert client_on_one_process.startswith(expected)


def test_the_same_script_under_torchrun_prints_once_and_the_same(client_on_one_process,
                                                                  checkpoints, tokenizer_path):
    # two processes on a two-shard checkpoint: results, scores and logits as on one (the
    # chunked pass's rounding noise, ~1e-6 and checked < 1e-4 by _run_client, is not compared:
    # the ranks' split of row-parallel sums changes its digits)
    def without_noise(out):
        return re.sub(r"chunked max diff \S+", "chunked max diff", out)

    assert without_noise(_run_client(checkpoints, tokenizer_path, 2, 2)) == without_noise(
        client_on_one_process)


def test_quiet_other_ranks_can_be_turned_off(checkpoints, tokenizer_path, tmp_path):
    """In one torchrun launch: a build with quiet_other_ranks=False leaves every rank's stdout
    alone; a later build with quiet_other_ranks=True (the default) silences rank 1's."""
    script = tmp_path / "both_ranks.py"
    script.write_text(
        "import sys\n"
        "import torch.distributed as dist\n"
        "from llama import Llama\n"
        "from llama.engine.distributed import shutdown\n"
        "for mode in ('loud', 'quiet'):\n"
        f"    g = Llama.build({checkpoints('gqa', 2)!r}, {tokenizer_path!r}, 32, 1,\n"
        "                    quiet_other_ranks=mode == 'quiet', verbose=False)\n"
        "    sys.stdout.write(f'{mode}: rank {dist.get_rank()} here\\n')  # one write: no mixing\n"
        "    sys.stdout.flush()\n"
        "shutdown()\n")
    result = run_script([str(script)], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(result.stdout.split("\n")) - {""} == {"loud: rank 0 here", "loud: rank 1 here",
                                                      "quiet: rank 0 here"}
