"""What quantized weights cost in quality, with margins from benchmarks/quant_quality.py (the
README's figures come from that program, on more text): a broken scale, zero point or route
fails here. Issue #14's targets: int8 perplexity within 0.5% of float32, int4 within 3%."""


import pytest
import torch

from benchmarks import quant_outliers as qo
from benchmarks import quant_quality as qq

WINDOWS = 8  # the first 8 of the benchmark's 33 held-out windows (BOS + 256 tokens)


@pytest.fixture(scope="module")
def demo_logits():
    """float32's logits, each format's, and the targets, on the same windows."""
    with torch.inference_mode():
        llama = qq.build_demo()
        windows = torch.tensor(qq.heldout_windows(llama.tokenizer, qq.DEMO_WINDOW, WINDOWS))
        logits = {None: qq.window_logits(llama, windows)}
        native = (("w8a8", None), ("w4a8", 32)) if qo.cpu_kernels.available() else ()
        for mode, group in (("int8", None), ("int4", 32)) + native:
            logits[mode] = qq.window_logits(qq.build_demo(mode, group), windows)
    return logits, windows[:, 1:]


@pytest.mark.parametrize("mode, max_ratio, max_kl, min_top1", [
    # measured on these windows: ratio 1.0002, KL 1.6e-4, top-1 0.994 (all 33 windows, in
    # README: 1.0005, 1.6e-4, 0.991)
    ("int8", 1.005, 1e-3, 0.97),
    # measured: ratio 1.0031, KL 0.0105, top-1 0.919 (33 windows: 1.0107, 0.0109, 0.922)
    ("int4", 1.03, 0.03, 0.85),
    # int8 weights and int8 activations (opt-in); 33 windows: 1.0006, 2.1e-4, 0.991
    pytest.param("w8a8", 1.005, 1e-3, 0.97, marks=pytest.mark.skipif(
        not qo.cpu_kernels.available(), reason="int8 activations take the native kernels")),
    # int4 g32 weights and int8 activations (opt-in); measured: ratio 1.0036, KL 0.0105,
    # top-1 0.919
    pytest.param("w4a8", 1.03, 0.03, 0.85, marks=pytest.mark.skipif(
        not qo.cpu_kernels.available(), reason="int8 activations take the native kernels")),
])
def test_demo_model_quantized_close_to_float32(demo_logits, mode, max_ratio, max_kl, min_top1):
    logits, targets = demo_logits
    ppl = qq.perplexities(logits[None], logits[mode], targets)
    dist = qq.distributions(logits[None], logits[mode])
    print(f"{mode}: perplexity {ppl['ppl']:.2f}, ratio {ppl['ratio']:.4f}, KL {dist['kl']:.2e}, "
          f"top-1 {dist['top1']:.3f}")
    assert ppl["ratio"] < max_ratio
    assert 1e-6 < dist["kl"] < max_kl  # above 0: the weights were quantized
    assert dist["top1"] > min_top1


def test_weight_only_keeps_top1_where_a_per_tensor_activation_scale_loses_it():
    """A small random model with outlier channels planted in its products' inputs (x50-x100,
    the float function unchanged): int8 weights with float activations keep most top-1
    choices, and so does our int8 kernel with its int16 activations; int8 activations with
    one scale per tensor keep almost none (measured: 0.72 and 0.0; other seeds: 0.61-0.72 and
    0-0.008; without the outliers both keep 0.86-0.95), with one per 32 values (llama.cpp's
    q8_0, and our opt-in int8 activations, which round so) fewer than float activations."""
    torch.manual_seed(0)
    qo.init_process_groups(torch.device("cpu"), 1, announce=False)
    args = qo.ModelArgs(dim=256, n_layers=2, n_heads=4, vocab_size=2048, max_seq_len=64,
                        max_batch_size=2)
    base = {k: v.float() for k, v in qo.random_weights(args, seed=0).items()
            if k != "rope.freqs"}
    dims = torch.randperm(args.dim, generator=torch.Generator().manual_seed(1))[:4]
    state = qo.plant_outliers(base, dims, torch.tensor(qo.OUTLIER_SCALES))
    tokens = torch.randint(3, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = qo.s_logits(qo.s_model(args, state), tokens, 2)
        assert torch.allclose(ref, qo.s_logits(qo.s_model(args, base), tokens, 2), rtol=0,
                              atol=1e-3)  # planting kept the float function
        int8 = qo.quantized_state(state, "int8", None)
        top1 = {per: qq.distributions(ref, qo.s_logits(qo.s_model(args, int8, per), tokens,
                                                       2))["top1"]
                for per in (None, "tensor", "float32", "block32")
                + (("kernel", "w8a8") if qo.cpu_kernels.available() else ())}
    print("top-1 agreement: " + ", ".join(f"{per}: {v:.3f}" for per, v in top1.items()))
    assert top1[None] > 0.5
    assert top1["tensor"] < 0.1
    if "kernel" in top1:
        # our decode kernel's int16 activations, for every product: as float32 activations
        # (measured 0.719 and 0.711), where llama.cpp's int8 blocks of 32 lose (0.492)
        assert abs(top1["kernel"] - top1["float32"]) < 0.02
        assert top1["block32"] < top1["kernel"] - 0.05
        # our int8 activations (activations="int8") round as the block32 foil does: they keep
        # what it keeps
        assert abs(top1["w8a8"] - top1["block32"]) < 0.02
