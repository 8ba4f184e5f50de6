"""Hugging Face directories, as transformers saves them, load through Llama.build: the fixture's
weights, tokens and logits; sharded indexes, tied embeddings, a Code-Llama-like config, two
processes; every refusal and error named."""

import json
import math
import os
import shutil

import pytest
import torch

from llama import Llama
from llama.args import ModelArgs
from llama.checkpoints.meta import CheckpointError
from llama.engine.validation import ArgumentFileNotFoundError
from llama.hf.config import UnsupportedConfigError, ffn_params
from llama.hf.format import rotary_rows_to_hf, rotary_rows_to_meta
from tests.conftest import run_workers
from tests.hf_fixtures import code_tokenizer_path, hub  # noqa: F401 (fixtures)

transformers = pytest.importorskip("transformers")

PROMPTS = ["The meaning of life is", "def f(x):", "上下五千年"]


def _build(ckpt_dir, tokenizer_path=None, **kwargs):
    return Llama.build(str(ckpt_dir), tokenizer_path, max_seq_len=64, max_batch_size=4,
                       verbose=False, device="cpu", **kwargs)


def _tokens():
    return torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(3))


def _logits(generator, tokens):
    return generator.model.forward(tokens, 0)


def _transformers_logits(directory, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits


def _greedy(generator):
    prompts = [generator.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    return generator.generate(prompts, 16, temperature=0)[0]


def _same_model(got, want):
    """Every weight bit for bit, greedy tokens exactly, logits within 1e-4."""
    a, b = got.model.state_dict(), want.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _greedy(got) == _greedy(want)
    torch.testing.assert_close(_logits(got, _tokens()), _logits(want, _tokens()),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_hub_directory_gives_the_fixture_model(kind, hub, build):
    directory = hub(kind)
    assert not (directory / "params.json").exists()
    got = _build(directory)  # tokenizer_path: the directory's tokenizer.model
    _same_model(got, build(kind))
    torch.testing.assert_close(_logits(got, _tokens()),
                               _transformers_logits(directory, _tokens()), atol=1e-4, rtol=1e-4)


def test_sharded_safetensors_index(hub):
    directory = hub("gqa", max_shard_size="40KB")
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    assert len(files) > 2 and (directory / "model.safetensors.index.json").is_file()
    _same_model(_build(directory), _build(hub("gqa")))


def test_code_llama_like_config(hub):
    """rope_theta 1e6, a 32016-piece vocabulary, grouped-query heads."""
    directory = hub("code")
    config = json.loads((directory / "config.json").read_text())
    assert config["vocab_size"] == 32016 and config["num_key_value_heads"] == 2
    got = _build(directory)
    assert got.model.params.rope_theta == 1e6 and got.tokenizer.n_words == 32016
    _same_model(got, _build(hub.meta("code")))
    tokens = torch.randint(3, 32016, (2, 24), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_logits(got, tokens), _transformers_logits(directory, tokens),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gqa", "code"])
def test_tied_embeddings(kind, hub):
    directory = hub(kind, tied=True)
    assert json.loads((directory / "config.json").read_text())["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    got = _build(directory)
    assert torch.equal(got.model.output.weight, got.model.tok_embeddings.weight)
    _same_model(got, _build(hub.meta(kind, tied=True)))


TWO_PROCESS_DIRS = [("gqa", "40KB", False), ("code", "1GB", True)]


@pytest.fixture(scope="module")
def two_process_runs(hub, tmp_path_factory):
    """mp_worker's outputs on 2 processes for each Hub directory, from one torchrun launch."""
    jobs = []
    for kind, shard_size, tied in TWO_PROCESS_DIRS:
        directory = hub(kind, max_shard_size=shard_size, tied=tied)
        jobs.append(dict(ckpt_dir=str(directory),
                         tokenizer_path=str(directory / "tokenizer.model")))
    return dict(zip(TWO_PROCESS_DIRS, run_workers(jobs, 2, tmp_path_factory.mktemp("two"))))


@pytest.mark.parametrize("kind, shard_size, tied", TWO_PROCESS_DIRS)
def test_two_processes_equal_one_process_on_meta_layout(kind, shard_size, tied, hub,
                                                        two_process_runs, tmp_path):
    """Each rank reads only its slices: rows of q/k (whole heads, reordered on their own),
    columns of the embedding and rows of the tied output layer."""
    tokenizer = hub(kind, max_shard_size=shard_size, tied=tied) / "tokenizer.model"
    got = two_process_runs[kind, shard_size, tied]
    (want,) = run_workers([dict(ckpt_dir=str(hub.meta(kind, tied=tied)),
                                tokenizer_path=str(tokenizer))], None, tmp_path)
    assert got["world"] == 2 and got["shapes_ok"]
    for g, w in zip(got["completions"], want["completions"]):
        assert g["tokens"] == w["tokens"]
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(g["logprobs"],
                                                                      w["logprobs"]))


def test_pytorch_bin_is_read_as_tensors_only(hub, tmp_path):
    directory = tmp_path / "bin"
    shutil.copytree(hub("gqa"), directory)
    from safetensors.torch import load_file

    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    _same_model(_build(directory), _build(hub("gqa")))
    marker = tmp_path / "code-ran"
    for runs in (print, os.system):  # torch words its refusal of these two differently
        torch.save({**state, "evil": Exploit(runs, f"touch {marker}")},
                   directory / "pytorch_model.bin")
        with pytest.raises(CheckpointError, match="pytorch_model.bin was refused.*arbitrary "
                                                  "code"):
            _build(directory)
    assert not marker.exists()


class Exploit:
    def __init__(self, function, argument):
        self.call = (function, (argument,))

    def __reduce__(self):
        return self.call


# ---------------------------------------------------------------------------------- refusals
REFUSED = [
    # linear, dynamic and llama3 scalings are run (tests/test_llama3_hub.py); the rest refused
    ("rope_scaling", {"type": "yarn", "factor": 2.0}, "rope_scaling=\\{'type': 'yarn'"),
    ("rope_parameters", {"rope_type": "longrope", "factor": 8.0, "rope_theta": 5e5},
     "rope_parameters=\\{'rope_type': 'longrope'"),
    ("model_type", "mistral", "model_type='mistral'"),
    ("architectures", ["LlamaForSequenceClassification"],
     "architectures=\\['LlamaForSequenceClassification'\\]"),
    ("attention_bias", True, "attention_bias=True"),
    ("mlp_bias", True, "mlp_bias=True"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("head_dim", 32, "head_dim=32"),
    ("quantization_config", {"quant_method": "gptq", "bits": 4}, "quantization_config="),
]


@pytest.fixture
def copy_of(hub, tmp_path):
    def _copy(kind="gqa", **options):
        directory = tmp_path / "copy"
        shutil.copytree(hub(kind, **options), directory)
        return directory
    return _copy


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("field, value, message", REFUSED, ids=[r[0] for r in REFUSED])
def test_configs_not_run_exactly_are_refused(field, value, message, copy_of):
    directory = copy_of()
    _edit_config(directory, **{field: value})
    with pytest.raises(UnsupportedConfigError, match=f"config.json: {message}.*not supported"):
        _build(directory)


# ------------------------------------------------------------------------------------ errors
def test_vocabulary_must_match_the_tokenizer(copy_of, tokenizer_path):
    directory = copy_of("code")
    with pytest.raises(CheckpointError, match="vocab_size=32016 but the tokenizer has 1000 "
                                              "pieces"):
        _build(directory, tokenizer_path)


def test_missing_unexpected_and_misshapen_tensors_are_named(copy_of):
    from safetensors.torch import load_file, save_file

    directory = copy_of()
    path = directory / "model.safetensors"
    state = load_file(path)
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.mlp.up_proj"
                                              r".weight'\]; unexpected tensors \['model.layers"
                                              r".0.self_attn.q_proj.bias'\]"):
        _build(directory)
    state = load_file(path)
    state.pop("model.layers.0.self_attn.q_proj.bias")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64, dtype=torch.bfloat16)
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.layers.1.mlp."
                                              r"up_proj.weight has shape \(100, 64\), expected "
                                              r"\(192, 64\)"):
        _build(directory)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(192, 64, dtype=torch.int8)
    save_file(state, path)
    with pytest.raises(CheckpointError, match="up_proj.weight is stored as I8.*quantized"):
        _build(directory)


def test_lm_head_beside_tied_embeddings_is_named(copy_of):
    directory = copy_of()
    _edit_config(directory, tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['lm_head.weight'\]; "
                                              r"config.json says tie_word_embeddings"):
        _build(directory)


def test_broken_files_are_named(copy_of):
    directory = copy_of("gqa", max_shard_size="40KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    wrong = dict(index, weight_map={**index["weight_map"], "model.norm.weight": first})
    (directory / "model.safetensors.index.json").write_text(json.dumps(wrong))
    with pytest.raises(CheckpointError, match=f"the index says model.norm.weight is in .*{first}"
                                              f", but it is not there"):
        _build(directory)
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    data = (directory / first).read_bytes()
    (directory / first).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{first} is truncated or is not a safetensors "
                                              f"file.*re-download"):
        _build(directory)
    (directory / first).unlink()
    with pytest.raises(CheckpointError, match=f"lists files that are not there.*{first}"):
        _build(directory)
    for path in directory.glob("model*"):
        path.unlink()
    with pytest.raises(CheckpointError, match="no weights in .*model.safetensors"):
        _build(directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        _build(directory)


def test_missing_config_fields_are_named(copy_of):
    directory = copy_of()
    config = json.loads((directory / "config.json").read_text())
    del config["intermediate_size"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"lacks \['intermediate_size'\]"):
        _build(directory)


def test_tokenizer_defaults_to_the_directory(copy_of):
    directory = copy_of()
    (directory / "tokenizer.model").unlink()
    with pytest.raises(ArgumentFileNotFoundError, match="tokenizer_path was not given and "
                                                        ".*tokenizer.model' does not exist"):
        _build(directory)
    (directory / "tokenizer.json").write_text("{}")
    with pytest.raises(ArgumentFileNotFoundError, match="only tokenizer.json"):
        _build(directory)


# -------------------------------------------------------------------------------- pure rules
@pytest.mark.parametrize("dim, heads, hidden, meta", [
    (4096, 32, 11008, (256, None)),  # 7B
    (5120, 40, 13824, (256, None)),  # 13B
    (8192, 64, 28672, (4096, 1.3)),  # 70B, as in Meta's params.json
    (8192, 64, 22016, (256, None)),  # Code Llama 34B (Meta writes 256 and 1.0: the same)
    (64, 4, 192, None),  # the fixtures
    (64, 4, 100, None),  # nothing round: multiple_of is the width itself
    (64, 4, 1000, None),  # wider than the rule's base
])
def test_ffn_params_reproduce_intermediate_size(dim, heads, hidden, meta):
    multiple_of, multiplier = ffn_params(dim, heads, hidden)
    args = ModelArgs(dim=dim, n_heads=heads, multiple_of=multiple_of,
                     ffn_dim_multiplier=multiplier)
    assert args.ffn_hidden_dim == hidden
    if meta is not None:
        assert (multiple_of, multiplier) == meta


def test_rotary_row_orders():
    """Meta's pairs (x0, x1), (x2, x3) against Hugging Face's halves: head h's row 2i is
    Hugging Face's row i and row 2i+1 its row head_dim/2 + i; reordering a block of whole
    heads alone equals reordering all and cutting the block."""
    n_heads, head_dim, dim = 4, 8, 5
    meta = torch.randn(n_heads * head_dim, dim)
    hf = rotary_rows_to_hf(meta, n_heads)
    for h in range(n_heads):
        for i in range(head_dim // 2):
            assert torch.equal(hf[h * head_dim + i], meta[h * head_dim + 2 * i])
            assert torch.equal(hf[h * head_dim + head_dim // 2 + i],
                               meta[h * head_dim + 2 * i + 1])
    assert torch.equal(rotary_rows_to_meta(hf, n_heads), meta)
    block = slice(head_dim, 3 * head_dim)  # heads 1 and 2
    assert torch.equal(rotary_rows_to_meta(hf[block], 2), meta[block])
    assert rotary_rows_to_meta(hf, n_heads, dtype=torch.bfloat16).dtype == torch.bfloat16
