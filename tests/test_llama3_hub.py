"""Llama 3.x in Hugging Face's layout, against transformers' LlamaForCausalLM: `rope_scaling`
llama3 and tied embeddings (Llama 3.2 1B/3B) written by llama.hf.convert and by transformers
itself, both ways; and the Hub's Llama 2 fine-tunes' linear and dynamic scalings."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llama import Llama
from llama.args import ModelArgs
from llama.checkpoints.meta import CheckpointError
from llama.hf.bridge import hf_model
from llama.hf.convert import hf_to_meta, meta_to_hf
from tests.conftest import model_args, run_workers
from tests.hf_fixtures import code_tokenizer_path, hub  # noqa: F401 (fixtures)

PROMPT = torch.randint(3, 1000, (1, 200), generator=torch.Generator().manual_seed(5))
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                  "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}


def _ours(ckpt_dir, tokenizer_path, max_seq_len=256):
    generator = Llama.build(str(ckpt_dir), tokenizer_path, max_seq_len=max_seq_len,
                            max_batch_size=1, verbose=False, device="cpu", dtype="float32")
    return generator.model.forward(PROMPT, 0)


def _transformers(hf_dir):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(PROMPT).logits


def _tensor_names(hf_dir):
    names = set()
    for path in Path(hf_dir).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            names |= set(f.keys())
    return names


def test_meta_to_hub_writes_llama3_scaling_and_ties_what_meta_holds_equal(
        hub, tokenizer_path, tmp_path):
    meta_dir = hub.meta("llama3", tied=True)  # output.weight equal to the embedding
    meta_to_hf(meta_dir, tmp_path / "hf", say=lambda line: None)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_scaling"] == LLAMA3_SCALING and config["rope_theta"] == 500000.0
    assert config["tie_word_embeddings"] is True and config["max_position_embeddings"] == 131072
    assert "lm_head.weight" not in _tensor_names(tmp_path / "hf")

    want = _ours(meta_dir, tokenizer_path)
    assert (_transformers(tmp_path / "hf") - want).abs().max() < 1e-4
    assert torch.equal(_ours(tmp_path / "hf", tokenizer_path), want)

    # and back: Meta's layout has no tie (output.weight is written), and says use_scaled_rope
    hf_to_meta(tmp_path / "hf", tmp_path / "meta", say=lambda line: None)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["use_scaled_rope"] is True and "rope_scaling" not in params
    original = json.loads((meta_dir / "params.json").read_text())
    # config.json names the feed-forward width, not Meta's rule: the same width, other numbers
    rule = ("multiple_of", "ffn_dim_multiplier")
    assert {k: v for k, v in params.items() if k not in rule} == \
        {k: v for k, v in original.items() if k not in rule}
    assert ModelArgs(**params).ffn_hidden_dim == ModelArgs(**original).ffn_hidden_dim
    before = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    after = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_untied_meta_checkpoint_keeps_its_output_matrix(checkpoints, tokenizer_path,
                                                           tmp_path):
    meta_to_hf(checkpoints("llama3"), tmp_path / "hf", tokenizer=tokenizer_path,
               say=lambda line: None)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert "lm_head.weight" in _tensor_names(tmp_path / "hf")
    assert (_transformers(tmp_path / "hf") - _ours(checkpoints("llama3"), tokenizer_path)
            ).abs().max() < 1e-4


def test_transformers_own_llama3_files_load(hub, tokenizer_path, tmp_path):
    """save_pretrained's files (transformers 5 writes rope_parameters), with the Hub's Llama
    3.x ids: eos_token_id a list, the tokenizer under original/."""
    src = hub("llama3", tied=True)
    directory = tmp_path / "hub"
    shutil.copytree(src, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "original").mkdir()
    (directory / "tokenizer.model").rename(directory / "original" / "tokenizer.model")
    assert "lm_head.weight" not in _tensor_names(directory)
    generator = Llama.build(str(directory), None, max_seq_len=256, max_batch_size=1,
                            verbose=False, device="cpu", dtype="float32")
    assert generator.model.params.rope_scaling.factor == 8.0
    got = generator.model.forward(PROMPT, 0)
    assert (got - _transformers(src)).abs().max() < 1e-4


def _hub_with_scaling(tmp_path, scaling, tokenizer_path, state):
    args = model_args("gqa", rope_scaling=scaling, max_seq_len=128)
    out = tmp_path / scaling["type"]
    hf_model(state, args).save_pretrained(out)
    shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    return out


@pytest.mark.parametrize("scaling", [
    {"type": "linear", "factor": 2.0},
    {"type": "linear", "factor": 4.0},
    {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 256},
])
def test_hub_llama2_scalings_are_transformers(scaling, checkpoints, tokenizer_path, tmp_path):
    state = {k: v.float() for k, v in checkpoints.state("gqa").items() if k != "rope.freqs"}
    directory = _hub_with_scaling(tmp_path, scaling, tokenizer_path, state)
    config = json.loads((directory / "config.json").read_text())
    if scaling["type"] == "dynamic":
        assert config["max_position_embeddings"] == 256  # transformers' threshold
    got = _ours(directory, tokenizer_path)
    want = _transformers(directory)
    assert (got - want).abs().max() < 1e-4
    plain = _ours(checkpoints("gqa"), tokenizer_path)
    if scaling["type"] == "linear":  # the comparison sees the scaling
        assert (plain - want).abs().max() > 1e-2
    else:  # dynamic within its context is the plain rotation, as transformers runs it
        assert (plain - want).abs().max() < 1e-4
        with pytest.raises(CheckpointError, match="max_seq_len=512 is past this model's 256 "
                                                  "positions, where dynamic rope scaling"):
            _ours(directory, tokenizer_path, max_seq_len=512)


@pytest.mark.parametrize("entry, message", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
     "rope_type 'yarn' is not implemented"),
    ({"rope_type": "llama3", "factor": 8.0}, "missing \\['high_freq_factor', 'low_freq_factor'\\]"),
    ({"type": "linear", "factor": 2.0, "finetuned": True}, "unknown \\['finetuned'\\]"),
    ({"type": "linear", "factor": -2.0}, "factor must be a positive number"),
])
def test_other_scalings_are_refused_by_name(entry, message, hub, tmp_path):
    directory = tmp_path / "copy"
    shutil.copytree(hub("gqa"), directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "rope_scaling": entry}))
    with pytest.raises(CheckpointError, match=message):
        Llama.build(str(directory), None, max_seq_len=64, max_batch_size=1, verbose=False)


def test_a_hub_config_with_llama3_scaling_is_read_as_meta_reads_use_scaled_rope():
    from llama.hf.config import model_args as hub_args

    config = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
              "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
              "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "max_position_embeddings": 131072, "tie_word_embeddings": True,
              "rope_scaling": {**LLAMA3_SCALING, "factor": 32.0}}
    args = hub_args(config, Path("config.json"))
    meta = ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                     ffn_dim_multiplier=1.5, multiple_of=256, rope_theta=500000.0,
                     use_scaled_rope=True)
    assert args.ffn_hidden_dim == meta.ffn_hidden_dim == 8192
    assert args.rope_scaling == meta.rope_scaling and args.use_scaled_rope


def test_a_tied_hub_model_quantizes_its_output_matrix_apart_from_the_embedding(hub,
                                                                              tokenizer_path):
    from llama.layers.linear import PackedInt8

    directory = hub("llama3", tied=True)
    quantized = Llama.build(str(directory), tokenizer_path, max_seq_len=256, max_batch_size=1,
                            verbose=False, device="cpu", quantize="int8").model
    assert isinstance(quantized.output.weight, PackedInt8)
    assert quantized.tok_embeddings.weight.is_floating_point()  # the embedding stays float
    full = _ours(directory, tokenizer_path)
    got = quantized.forward(PROMPT, 0)
    assert ((got - full).norm() / full.norm()).item() < 0.05


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_tied_hub_model_quantized_to_metas_layout_loads_as_quantizing_at_load(
        mode, hub, tokenizer_path, tmp_path):
    from llama.quantize.cli import quantize_checkpoint

    directory = hub("llama3", tied=True)
    quantize_checkpoint(directory, tmp_path / "q", mode, say=lambda line: None)
    params = json.loads((tmp_path / "q" / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["quantization"]["mode"] == mode

    def logits(ckpt_dir, **kwargs):
        generator = Llama.build(str(ckpt_dir), tokenizer_path, max_seq_len=256,
                                max_batch_size=1, verbose=False, device="cpu", **kwargs)
        return generator.model.forward(PROMPT, 0)

    assert torch.equal(logits(tmp_path / "q"), logits(directory, quantize=mode))


def test_a_tied_hub_model_on_two_processes_is_metas_layout_on_one(hub, tokenizer_path,
                                                                  tmp_path):
    (split,) = run_workers([dict(ckpt_dir=str(hub("llama3", tied=True)),
                                 tokenizer_path=tokenizer_path)], 2, tmp_path)
    (one,) = run_workers([dict(ckpt_dir=str(hub.meta("llama3", tied=True)),
                               tokenizer_path=tokenizer_path)], None, tmp_path)
    assert split["world"] == 2 and split["shapes_ok"]
    for got, want in zip(split["completions"], one["completions"]):
        assert got["tokens"] == want["tokens"]
        assert got["logprobs"] == pytest.approx(want["logprobs"], abs=1e-4)


def test_conversion_with_metas_llama3_tokenizer_and_vocabulary(tmp_path):
    """Llama 3's real vocabulary (128,256 rows) and Meta's tiktoken tokenizer.model (shipped by
    llama-models): Llama 3's ids in config.json, the tokenizer carried both ways (from the
    Hub's original/ on the way back)."""
    import llama_models

    from llama.checkpoints.fixtures import LLAMA3_SHAPE, write_random_checkpoint
    from llama.hf.convert import bpe_vocab_size, check_tokenizer

    meta_tokenizer = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    assert bpe_vocab_size(meta_tokenizer) == 128256 and check_tokenizer(meta_tokenizer,
                                                                        128256) is None
    with pytest.raises(CheckpointError, match="has 128256 pieces but the weights have 1000"):
        check_tokenizer(meta_tokenizer, 1000)
    args = ModelArgs(**LLAMA3_SHAPE, vocab_size=128256)
    write_random_checkpoint(tmp_path / "meta", args, seed=4)
    shutil.copyfile(meta_tokenizer, tmp_path / "meta" / "tokenizer.model")
    assert json.loads((tmp_path / "meta" / "params.json").read_text())["vocab_size"] == 128256

    meta_to_hf(tmp_path / "meta", tmp_path / "hf", say=lambda line: None)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((tmp_path / "hf" / name).read_text())
        assert (config["bos_token_id"], config["eos_token_id"]) == (128000,
                                                                    [128001, 128008, 128009])
    # where the Hub keeps it: llama.cpp's converter takes a top-level one for SentencePiece's
    assert not (tmp_path / "hf" / "tokenizer.model").exists()
    assert (tmp_path / "hf" / "original" / "tokenizer.model").read_bytes() == \
        meta_tokenizer.read_bytes()
    _check_transformers_tokenizer(tmp_path / "hf", meta_tokenizer)

    hf_to_meta(tmp_path / "hf", tmp_path / "back", say=lambda line: None)
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == meta_tokenizer.read_bytes()
    assert json.loads((tmp_path / "back" / "params.json").read_text())["vocab_size"] == 128256
    before = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    after = torch.load(tmp_path / "back" / "consolidated.00.pth", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)


TEXTS = ["Hello world", "  leading spaces\n\n\nand newlines\t\ttabs  ", "中文的提示词，你好！",
         "emoji 🦙🦙 and 12345678 digits", "it's they'LL I'd", "x" * 3000 + " " * 50 + "end"]


def _check_transformers_tokenizer(hf_dir, meta_tokenizer):
    """The tokenizer.json and chat template written beside the weights, read by transformers,
    give Meta's tokens (Llama3Tokenizer's, checked against Meta's code in test_tokenizer3)."""
    from transformers import AutoTokenizer

    from llama.chat_format3 import dialog_to_tokens
    from llama.tokenizer3 import Llama3Tokenizer

    ours = Llama3Tokenizer(str(meta_tokenizer))
    theirs = AutoTokenizer.from_pretrained(str(hf_dir))
    assert (theirs.bos_token_id, theirs.eos_token_id) == (128000, 128009)
    for text in TEXTS:
        ids = ours.encode(text, bos=True, eos=False)
        assert theirs(text)["input_ids"] == ids, text[:40]
        assert theirs.decode(ids, skip_special_tokens=True) == text
    dialog = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "What is 2+2?"},
              {"role": "assistant", "content": " Four. "},
              {"role": "user", "content": "Et en 中文 ?"}]
    rendered = theirs.apply_chat_template(dialog, tokenize=True, add_generation_prompt=True)
    assert list(rendered["input_ids"]) == dialog_to_tokens(dialog, ours)


def test_without_transformers_llama3s_tokenizer_is_copied_and_the_user_told(tmp_path,
                                                                           monkeypatch):
    import llama_models

    from llama.checkpoints.fixtures import LLAMA3_SHAPE, write_random_checkpoint
    from llama.hf import llama3_tokenizer

    def missing(*args):
        raise ImportError("No module named 'transformers'")

    monkeypatch.setattr(llama3_tokenizer, "write_tokenizer_files", missing)
    write_random_checkpoint(tmp_path / "meta", ModelArgs(**LLAMA3_SHAPE, vocab_size=128256),
                            seed=4)
    shutil.copyfile(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model",
                    tmp_path / "meta" / "tokenizer.model")
    said = []
    meta_to_hf(tmp_path / "meta", tmp_path / "hf", say=said.append)
    assert (tmp_path / "hf" / "original" / "tokenizer.model").exists()
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    assert any('pip install -e ".[hf]"' in line for line in said), said
