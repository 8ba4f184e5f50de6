"""Llama 3.x's model in Meta's layout against Meta's own code (the `llama-models` package, a
test-only dependency): params.json's fields, the llama3 rotary scaling, and greedy tokens and
logits of a random Llama-3-shaped checkpoint (GQA, ffn_dim_multiplier, rope_theta 500000,
use_scaled_rope, a cut-down vocabulary); then the same checkpoint resharded, on two processes
and quantized."""

import json
from pathlib import Path

import llama_models.llama3.model as meta_model  # the reference: never skipped (dev deps)
import pytest
import torch

from llama.args import ModelArgs
from llama.checkpoints import meta as checkpoint
from llama.checkpoints.meta import CheckpointError
from llama.checkpoints.reshard import reshard
from llama.layers.linear import PackedInt8
from llama.layers.rotary import precompute_freqs_cis
from llama.quantize.formats import is_quantized, quantize
from llama.rope_scaling import RopeScaling, RopeScalingError
from tests.conftest import model_args, run_workers

# Meta's params.json of Llama 3.1 8B and 3.2 1B (llama-models' sku_list), as downloaded.
LLAMA31_8B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
              "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05,
              "rope_theta": 500000.0, "use_scaled_rope": True}
LLAMA32_1B = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
              "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05,
              "rope_theta": 500000.0, "use_scaled_rope": True}


# ------------------------------------------------------------------------- rotary scaling
@pytest.mark.parametrize("head_dim, theta", [(128, 500000.0), (64, 500000.0), (16, 500000.0),
                                             (128, 10000.0)])
def test_scaled_rotary_table_is_metas(head_dim, theta):
    ours = precompute_freqs_cis(head_dim, 4096, theta, use_scaled=True)
    metas = meta_model.precompute_freqs_cis(head_dim, 4096, theta, use_scaled=True)
    assert torch.equal(ours, metas)
    # and the scaling does something at these lengths: Meta's table without it differs
    plain = meta_model.precompute_freqs_cis(head_dim, 4096, theta, use_scaled=False)
    assert (ours - plain).abs().max() > 0.1


def test_use_scaled_rope_means_metas_constants_and_32_for_llama32_shapes():
    freqs = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    eight = ModelArgs(**LLAMA31_8B).rope_scaling
    assert eight == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    from llama.rope_scaling import scale_frequencies

    assert torch.equal(scale_frequencies(freqs, eight), meta_model.apply_scaling(freqs))
    args = ModelArgs(**LLAMA32_1B)
    assert args.rope_scaling.factor == 32.0 and args.use_scaled_rope
    assert ModelArgs(**{**LLAMA32_1B, "dim": 3072, "n_layers": 28, "n_heads": 24,
                        "ffn_dim_multiplier": 1.0}).rope_scaling.factor == 32.0
    # a scaling in params.json ("rope_scaling", ours) wins over the shape's
    forced = ModelArgs(**{**LLAMA32_1B, "rope_scaling": {**eight.to_json()}})
    assert forced.rope_scaling == eight


# ------------------------------------------------------------------------------ params.json
def _params_dir(tmp_path, params):
    (tmp_path / "params.json").write_text(json.dumps(params))
    return tmp_path


def test_metas_llama3_params_json_is_read(tmp_path):
    args = checkpoint.model_args(_params_dir(tmp_path, LLAMA31_8B), 128, 2, 128256)
    assert (args.n_kv_heads, args.ffn_hidden_dim, args.rope_theta) == (8, 14336, 500000.0)
    assert args.use_scaled_rope and args.rope_scaling.factor == 8.0
    # Meta's text-model defaults of its vision and quantization fields are harmless
    text = {**LLAMA31_8B, "vision_chunk_size": -1, "quantization_args": None}
    assert checkpoint.model_args(_params_dir(tmp_path, text), 128, 2, 128256) == args
    with pytest.raises(CheckpointError, match="vocab_size=128256 but the tokenizer has 32000"):
        checkpoint.model_args(_params_dir(tmp_path, LLAMA31_8B), 128, 2, 32000)


@pytest.mark.parametrize("field, value, message", [
    ("vision_chunk_size", 560, "Llama 3.2 Vision"),
    ("vision_num_cross_attention_layers", 8, "Vision models are not supported"),
    ("quantization_args", {"scheme": "int4_weight_int8_dynamic_activation", "group_size": 32},
     "quantize="),
    ("lora_args", {"rank": 16, "scale": 2.0}, "adapter tensors"),
    ("max_seq_len", 8192, "a Llama.build argument"),
    ("use_scaled_rope", "yes", "use_scaled_rope must be true or false"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "'yarn' is not implemented"),
    ("rope_frobnication", 1, "fields this library does not know: \\['rope_frobnication'\\]"),
])
def test_params_json_fields_this_library_does_not_run_are_refused(tmp_path, field, value,
                                                                  message):
    with pytest.raises(CheckpointError, match=message):
        checkpoint.model_args(_params_dir(tmp_path, {**LLAMA31_8B, field: value}), 128, 2,
                              128256)


def test_dynamic_scaling_is_refused_past_its_context():
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64}
    assert ModelArgs(dim=64, n_layers=1, n_heads=4, max_seq_len=64, rope_scaling=dynamic)
    with pytest.raises(RopeScalingError, match="max_seq_len=65 is past this model's 64"):
        ModelArgs(dim=64, n_layers=1, n_heads=4, max_seq_len=65, rope_scaling=dynamic)
    with pytest.raises(RopeScalingError, match="contradicts rope_scaling 'linear'"):
        ModelArgs(dim=64, n_layers=1, n_heads=4, use_scaled_rope=True,
                  rope_scaling={"type": "linear", "factor": 2.0})


def test_context_warnings_know_llama3s_trained_contexts(build):
    from llama.engine.validation import LlamaWarning, context_warning

    assert "the 8192 tokens Llama 3 was" in context_warning(8193, 500000.0)
    assert context_warning(8192, 500000.0) is None
    assert context_warning(131072, 500000.0, "llama3") is None
    assert "the 131072 tokens Llama 3.1+ was" in context_warning(131073, 500000.0, "llama3")
    assert context_warning(8192, 10000.0, "linear") is None  # a fine-tune's own length
    assert "4096 tokens Llama 2" in context_warning(4097, 10000.0)
    with pytest.warns(LlamaWarning, match="max_seq_len=140000 is above the 131072 tokens"):
        build("llama3", max_seq_len=140000, max_batch_size=1)


# ------------------------------------------------------------------ against Meta's model
def _metas_transformer(ckpt_dir: str, max_seq_len: int, **changes):
    """Meta's llama3 Transformer (llama-models 0.3.0 runs on the CPU as it is, once
    fairscale's model-parallel group exists) holding the checkpoint's weights in float32."""
    from llama_models.llama3.args import ModelArgs as MetaArgs

    from llama.engine.distributed import init_process_groups

    init_process_groups(torch.device("cpu"), announce=False)
    params = {**json.loads((Path(ckpt_dir) / "params.json").read_text()), **changes}
    state = torch.load(Path(ckpt_dir) / "consolidated.00.pth", map_location="cpu",
                       weights_only=True)
    state.pop("rope.freqs")  # the reference computes its own (its model has no such tensor)
    model = meta_model.Transformer(MetaArgs(max_seq_len=max_seq_len, max_batch_size=1, **params))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model


def _metas_greedy(model, prompt, steps, eos_id):
    """Meta's generate at temperature 0 for one prompt: prefill, then one token a step."""
    tokens, logprobs = [], []
    logits = model.forward(torch.tensor([prompt]), 0)[0, -1]
    for position in range(len(prompt), len(prompt) + steps):
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(torch.log_softmax(logits.float(), -1)[token].item())
        if token == eos_id:
            break
        logits = model.forward(torch.tensor([[token]]), position)[0, -1]
    return tokens, logprobs


def test_logits_and_greedy_tokens_are_metas(build, checkpoints):
    """A prompt of 200 tokens, so that the scaled (slowed) frequencies turn visibly."""
    max_seq_len = 256
    prompt = torch.randint(3, 1000, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    generator = build("llama3", max_seq_len=max_seq_len, max_batch_size=1, dtype="float32")
    meta = _metas_transformer(checkpoints("llama3"), max_seq_len)
    want = meta.forward(torch.tensor([prompt]), 0)
    got = generator.model.forward(torch.tensor([prompt]), 0)
    assert (got - want).abs().max() < 1e-4
    # the comparison sees the scaling: Meta's model without it is far off
    unscaled = _metas_transformer(checkpoints("llama3"), max_seq_len, use_scaled_rope=False)
    assert (unscaled.forward(torch.tensor([prompt]), 0) - want).abs().max() > 1e-2

    tokens, logprobs = generator.generate([prompt], max_gen_len=24, temperature=0,
                                          logprobs=True)
    meta_tokens, meta_logprobs = _metas_greedy(meta, prompt, 24, generator.tokenizer.eos_id)
    assert tokens[0] == meta_tokens[:len(tokens[0])] and len(tokens[0]) >= 8
    assert max(abs(a - b) for a, b in zip(logprobs[0], meta_logprobs)) < 1e-4


# -------------------------------------------------- any shard count, processes, quantized
def test_resharded_there_and_back_gives_the_same_tensors(checkpoints, tmp_path):
    source = Path(checkpoints("llama3"))
    reshard(source, tmp_path / "two", 2, verbose=False)
    reshard(tmp_path / "two", tmp_path / "one", 1, verbose=False)
    assert json.loads((tmp_path / "one" / "params.json").read_text()) == \
        json.loads((source / "params.json").read_text())
    before = torch.load(source / "consolidated.00.pth", weights_only=True)
    after = torch.load(tmp_path / "one" / "consolidated.00.pth", weights_only=True)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_shards_without_rope_freqs_load_alike(build, checkpoints, tokenizer_path, tmp_path):
    """Meta's Llama 3 shards need not carry the rope.freqs extra Llama 2's did."""
    from llama import Llama
    from llama.checkpoints.saving import save_checkpoint, split_state_dict

    state = {k: v for k, v in checkpoints.state("llama3").items() if k != "rope.freqs"}
    params = json.loads((Path(checkpoints("llama3")) / "params.json").read_text())
    save_checkpoint(tmp_path, split_state_dict(state, 1), params)
    tokens = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(1))
    without = Llama.build(str(tmp_path), tokenizer_path, max_seq_len=64, max_batch_size=1,
                          verbose=False, device="cpu")
    assert torch.equal(without.model.forward(tokens, 0),
                       build("llama3", max_batch_size=1).model.forward(tokens, 0))


@pytest.fixture(scope="module")
def split_runs(checkpoints, tokenizer_path, tmp_path_factory):
    """mp_worker's outputs for the one-shard checkpoint on 2 processes, float and int8 (at
    load), from one torchrun launch."""
    jobs = [dict(ckpt_dir=checkpoints("llama3", 1), tokenizer_path=tokenizer_path,
                 quantize=quantize) for quantize in ("", "int8")]
    return dict(zip(("", "int8"), run_workers(jobs, 2, tmp_path_factory.mktemp("split"))))


@pytest.mark.parametrize("quantize", ["", "int8"])
def test_one_shard_on_two_processes_is_two_shards_on_one(quantize, split_runs, checkpoints,
                                                         tokenizer_path, tmp_path):
    split = split_runs[quantize]
    (merged,) = run_workers([dict(ckpt_dir=checkpoints("llama3", 2),
                                  tokenizer_path=tokenizer_path, quantize=quantize)], None,
                            tmp_path)
    assert split["world"] == 2 and merged["world"] == 1
    assert split["shapes_ok"] and merged["shapes_ok"]
    # quantized: each rank's row-parallel partial sums come from bfloat16 prefill products, so
    # logprobs agree to bfloat16's rounding and greedy paths may part later (as for Llama 2,
    # tests/test_quantized_model.py)
    n, tolerance = (None, 1e-4) if not quantize else (8, 0.1)
    for got, want in zip(split["completions"], merged["completions"]):
        assert got["tokens"][:n] == want["tokens"][:n]
        assert got["logprobs"][:n] == pytest.approx(want["logprobs"][:n], abs=tolerance)


def test_int8_quantizes_the_output_matrix_and_computes_its_weights(build, checkpoints):
    quantized = build("llama3", quantize="int8").model
    assert isinstance(quantized.output.weight, PackedInt8)
    assert is_quantized("output.weight")
    state = {name: tensor.float() for name, tensor in checkpoints.state("llama3").items()
             if name != "rope.freqs"}
    state = {name: quantize(t, "int8").dequantize() if is_quantized(name) else t
             for name, t in state.items()}
    from llama.model import Transformer

    expected = Transformer.from_state_dict(model_args("llama3", max_seq_len=64, max_batch_size=4),
                                           state)
    tokens = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    got, want = quantized.forward(tokens, 0), expected.forward(tokens, 0)
    assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_memory_estimate_of_llama3_shapes_counts_the_published_parameters():
    """Parameter counts as published for the Hub's (tied) models, plus the output matrix our
    model holds apart; quantized, the 128,256-row output matrix is 1 byte a weight."""
    from llama.args import count_parameters
    from llama.checkpoints.memory import LLAMA3, weight_bytes

    published = {"3.2 1B": 1_235_814_400, "3.2 3B": 3_212_749_824, "3.1 8B": 8_030_261_248}
    for name, count in published.items():
        args = LLAMA3[name]
        output = args.vocab_size * args.dim
        tied = name.startswith("3.2")
        assert count_parameters(args) - (output if tied else 0) == count
        assert weight_bytes(args) == 2 * count_parameters(args)
        kept = (args.vocab_size + 2 * args.n_layers + 1) * args.dim  # embedding and norms
        int8 = weight_bytes(args, "int8")
        assert 2 * kept + (count_parameters(args) - kept) < int8 < \
            2 * kept + 1.01 * (count_parameters(args) - kept)
