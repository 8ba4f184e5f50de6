"""The transformer: Meta's layout, parameter counts, and the KV cache against full passes."""

import pytest
import torch

import llama.layers.float_linear
from llama.checkpoints.meta import IGNORED_KEYS, full_shapes, shard_shape, split_dim
from llama.layers.linear import linear
from llama.model import ModelArgs, Transformer, attention_mask, count_parameters
from tests.meta_reference import ReferenceModel

META_SHAPES = {
    "7B": dict(dim=4096, n_layers=32, n_heads=32),
    "13B": dict(dim=5120, n_layers=40, n_heads=40),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                ffn_dim_multiplier=1.3),
}
META_COUNTS = {"7B": 6_738_415_616, "13B": 13_015_864_320, "70B": 68_976_648_192}


@pytest.fixture(scope="module")
def model_parallel_group(build):
    build("gqa")  # joins a one-process group, as Llama.build does


@pytest.mark.parametrize("name", sorted(META_SHAPES))
def test_parameter_counts_of_meta_shapes_on_meta_device(name, model_parallel_group):
    args = ModelArgs(vocab_size=32000, **META_SHAPES[name])
    with torch.device("meta"):
        model = Transformer(args)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == META_COUNTS[name]
    assert count_parameters(args) == META_COUNTS[name]


def test_names_and_shapes_equal_meta_layout(model_parallel_group):
    args = ModelArgs(vocab_size=32000, **META_SHAPES["70B"])
    with torch.device("meta"):
        model = Transformer(args)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == full_shapes(args)
    # 70B layer 0 as Meta's consolidated.00.pth of 8 holds it:
    assert shard_shape("layers.0.attention.wq.weight", shapes["layers.0.attention.wq.weight"], 8) \
        == (1024, 8192)
    assert shard_shape("layers.0.attention.wk.weight", shapes["layers.0.attention.wk.weight"], 8) \
        == (128, 8192)
    assert shard_shape("layers.0.feed_forward.w2.weight",
                       shapes["layers.0.feed_forward.w2.weight"], 8) == (8192, 3584)
    assert shard_shape("tok_embeddings.weight", (32000, 8192), 8) == (32000, 1024)
    assert shard_shape("output.weight", (32000, 8192), 8) == (4000, 8192)
    assert split_dim("layers.3.ffn_norm.weight") is None


def test_ffn_hidden_sizes_follow_the_reference_rule():
    assert ModelArgs(**META_SHAPES["7B"]).ffn_hidden_dim == 11008
    assert ModelArgs(**META_SHAPES["13B"]).ffn_hidden_dim == 13824
    assert ModelArgs(**META_SHAPES["70B"]).ffn_hidden_dim == 28672


@pytest.mark.parametrize("bad, message", [
    (dict(dim=64, n_heads=5), "divisible by n_heads"),
    (dict(dim=64, n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(n_layers=0), "positive integer"),
])
def test_impossible_shapes_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs(**bad)


def _full_logits(generator, tokens):
    cache = generator.model.new_cache(tokens.shape[0], tokens.shape[1])
    return generator.model.forward(tokens, 0, cache)


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_cached_decoding_equals_full_forward(kind, build):
    generator = build(kind)
    torch.manual_seed(0)
    tokens = torch.randint(3, 1000, (2, 20))
    full = _full_logits(generator, tokens)
    cache = generator.model.new_cache(2, 20)
    # a chunk, then single tokens, then a chunk after a non-empty cache
    pieces = [(0, 7), (7, 8), (8, 9), (9, 15), (15, 20)]
    got = torch.cat([generator.model.forward(tokens[:, a:b], a, cache) for a, b in pieces], 1)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gqa", "mha"])
@pytest.mark.parametrize("shape", [(2, 17), (3, 100)])  # 300 rows: the long-prefill products
def test_forward_equals_independent_reference_math(kind, shape, build, checkpoints):
    generator = build(kind)
    reference = ReferenceModel(checkpoints.state(kind), checkpoints.params(kind), 3, 100)
    tokens = torch.randint(3, 1000, shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_full_logits(generator, tokens), reference.forward(tokens, 0),
                               atol=1e-4, rtol=1e-4)


def test_left_padded_rows_equal_unpadded_rows(build):
    generator = build("gqa")
    rows = [torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(n))
            for n in (5, 12)]
    tokens = torch.zeros((2, 12), dtype=torch.long)
    tokens[0, 7:] = rows[0]
    tokens[1] = rows[1]
    pads = torch.tensor([7, 0])
    cache = generator.model.new_cache(2, 14)
    padded = generator.model.forward(tokens, 0, cache, pads)
    step = generator.model.forward(torch.tensor([[5], [6]]), 12, cache, pads)
    for i, row in enumerate(rows):
        alone = _full_logits(generator, torch.cat([row, torch.tensor([5 + i])])[None])
        n = len(row)
        torch.testing.assert_close(padded[i, 12 - n:], alone[0, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step[i, 0], alone[0, n], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(padded[i]).all()


@pytest.mark.parametrize("kind", ["gqa", "mha"])
@pytest.mark.parametrize("lengths", [(9, 9), (4, 9), (90, 120, 120)])  # 330 rows: long-prefill path
def test_last_logits_only_prefill_equals_the_full_prefill(kind, lengths, build):
    """With last_logits_only the last layer runs its attention output and feed-forward for the
    last position alone: the logits are the full pass's last ones, the cache is the same, and
    so is the next step read from it."""
    model = build(kind).model
    bsz, longest = len(lengths), max(lengths)
    tokens = torch.randint(3, 1000, (bsz, longest), generator=torch.Generator().manual_seed(4))
    pads = None if min(lengths) == longest else torch.tensor([longest - n for n in lengths])
    full_cache, last_cache = model.new_cache(bsz, longest + 1), model.new_cache(bsz, longest + 1)
    full = model.forward(tokens, 0, full_cache, pads)
    last = model.forward(tokens, 0, last_cache, pads, last_logits_only=True)
    assert last.shape == (bsz, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
    for got, expected in zip(last_cache.k + last_cache.v, full_cache.k + full_cache.v):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    step = torch.tensor([[5]] * bsz)
    torch.testing.assert_close(model.forward(step, longest, last_cache, pads),
                               model.forward(step, longest, full_cache, pads),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 5, 130, 300])
@pytest.mark.parametrize("n_out", [256, 250, 7])  # split in blocks; not splittable
def test_linear_fast_paths_equal_f_linear(rows, n_out):
    """linear() takes its own route per row count (row blocks for one row, oneDNN for more);
    each must give F.linear's result up to float32 summation order."""
    generator = torch.Generator().manual_seed(rows * 1000 + n_out)
    weight = torch.randn(n_out, 192, generator=generator)
    x = torch.randn(1, rows, 192, generator=generator)
    expected = torch.nn.functional.linear(x, weight)
    got = linear(x, weight)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # a non-contiguous weight (a view of every other row) takes the plain path
    torch.testing.assert_close(linear(x, weight[::2]), x @ weight[::2].t(), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not llama.layers.float_linear._ONEDNN, reason="torch built without oneDNN")
def test_a_compiled_product_of_few_rows_keeps_onednn(monkeypatch):
    """Under torch.compile the 2-256-row route stays oneDNN's product (an operator of ours
    around it), not MKL's F.linear, 2-3x slower there: same result, and oneDNN is called."""
    calls = []
    onednn = llama.layers.float_linear._onednn
    monkeypatch.setattr(llama.layers.float_linear, "_onednn",
                        lambda x, w: calls.append(1) or onednn(x, w))
    weight = torch.randn(256, 192)
    x = torch.randn(4, 192)
    step = torch.compile(lambda x: linear(x, weight), fullgraph=True, dynamic=False)
    torch.testing.assert_close(step(x), torch.nn.functional.linear(x, weight), atol=1e-5,
                               rtol=1e-5)
    assert calls


def test_attention_mask_hides_padding_and_the_future():
    mask = attention_mask(torch.arange(0, 3), 3, torch.tensor([2, 0]))
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].tolist() == [[True, False, False], [False, True, False],
                                   [False, False, True]]
    assert mask[1, 0].tolist() == [[True, False, False], [True, True, False],
                                   [True, True, True]]
    # one query at a position held in a tensor, over a longer cache: the later slots hidden
    assert attention_mask(torch.tensor([2]), 5, None).tolist() == [[[[True] * 3 + [False] * 2]]]


@pytest.mark.parametrize("padded", [False, True])
def test_static_shape_step_equals_the_growing_step(build, padded):
    """The compiled decode step's form (position as a tensor, whole cache read under a mask)
    gives the logits of the ordinary step, which reads only the slots written so far."""
    model = build("gqa").model
    prompts = torch.randint(3, 1000, (2, 6), generator=torch.Generator().manual_seed(3))
    pads = torch.tensor([2, 0]) if padded else None
    growing, static = model.new_cache(2, 12), model.new_cache(2, 12)
    model.forward(prompts, 0, growing, pads)
    model.forward(prompts, 0, static, pads)
    position = torch.tensor([6])
    for step, token in enumerate([7, 8, 9]):
        tokens = torch.full((2, 1), token)
        expected = model.forward(tokens, 6 + step, growing, pads, last_logits_only=True)
        got = model.forward(tokens, position, static, pads, last_logits_only=True)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        position += 1
    torch.testing.assert_close(static.k, growing.k, atol=1e-5, rtol=1e-5)


def test_state_dict_keeps_meta_names_after_fusing(build, checkpoints):
    generator = build("gqa")
    state = generator.model.state_dict()
    expected = checkpoints.state("gqa")
    assert set(state) == set(expected) - set(IGNORED_KEYS)
    for name, tensor in state.items():
        # the checkpoint's bfloat16 matrices as they are (llama/layers/bf16.py); norms in float32
        assert tensor.dtype == (torch.float32 if name.endswith("norm.weight") else
                                torch.bfloat16), name
        torch.testing.assert_close(tensor.float(), expected[name].float(), atol=0, rtol=0)
    attention = generator.model.layers[0].attention
    # the fused matrix and the named weights share memory
    assert attention.wq.weight.data_ptr() == attention.wqkv.data_ptr()
