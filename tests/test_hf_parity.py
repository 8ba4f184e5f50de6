"""An independent implementation agrees: Hugging Face transformers on the same weights."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llama.hf.bridge import hf_model  # noqa: E402
from tests.conftest import model_args  # noqa: E402


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_logits_equal_transformers_llama(kind, build, checkpoints):
    generator = build(kind)
    reference = hf_model(checkpoints.state(kind), model_args(kind, max_seq_len=64))
    tokens = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reference(tokens).logits
    cache = generator.model.new_cache(2, 24)
    got = generator.model.forward(tokens, 0, cache)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_greedy_generation_equals_transformers(build, checkpoints):
    generator = build("gqa")
    reference = hf_model(checkpoints.state("gqa"), model_args("gqa", max_seq_len=64))
    prompt = generator.tokenizer.encode("The meaning of life is", bos=True, eos=False)
    tokens, _ = generator.generate([prompt], 16, temperature=0)
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                 eos_token_id=2, pad_token_id=0)
    assert tokens[0] == out[0, len(prompt):].tolist()
