"""Hugging Face directories for the tests, saved by transformers itself (`save_pretrained` of a
`LlamaForCausalLM` holding a fixture's weights), and a Code-Llama-like model: rope_theta 1e6,
a 32016-piece vocabulary, grouped-query heads."""

import shutil
from pathlib import Path

import pytest
import torch

from llama.args import ModelArgs
from llama.checkpoints.fixtures import random_weights, train_tokenizer
from llama.checkpoints.saving import params_json, save_checkpoint, split_state_dict
from tests.conftest import model_args

CODE_VOCAB = 32016
CODE_SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                  rope_theta=1e6, vocab_size=CODE_VOCAB)


def save_hub(out: Path, state, args: ModelArgs, tokenizer_path, max_shard_size="1GB",
             tied=False) -> Path:
    """transformers' own files for these weights (bfloat16, as the fixtures are), with the
    tokenizer copied in as Hub repositories have it."""
    from llama.hf.bridge import hf_model

    model = hf_model(state, args, dtype=torch.bfloat16, tie_word_embeddings=tied)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    shutil.copyfile(tokenizer_path, Path(out) / "tokenizer.model")
    return Path(out)


def save_meta(out: Path, state, args: ModelArgs, tokenizer_path, n_shards=1) -> Path:
    save_checkpoint(out, split_state_dict(state, n_shards), params_json(args))
    shutil.copyfile(tokenizer_path, Path(out) / "tokenizer.model")
    return Path(out)


class Hub:
    """Hub directories by (shape, largest file, tied output layer), and their weights as an
    unsharded Meta state dict; made once per session."""

    def __init__(self, root: Path, checkpoints, tokenizer_path, code_tokenizer_path):
        self.root, self.checkpoints = root, checkpoints
        self.tokenizers = {"gqa": tokenizer_path, "mha": tokenizer_path,
                           "llama3": tokenizer_path, "code": code_tokenizer_path}
        self.dirs, self.states = {}, {}

    def args(self, kind: str, **overrides) -> ModelArgs:
        if kind == "code":
            return ModelArgs(**{**CODE_SHAPE, **overrides})
        return model_args(kind, **overrides)

    def state(self, kind: str, tied: bool = False):
        if (kind, tied) not in self.states:
            state = (random_weights(self.args(kind), seed=21) if kind == "code"
                     else self.checkpoints.state(kind))
            if tied:
                state = {**state, "output.weight": state["tok_embeddings.weight"]}
            self.states[kind, tied] = state
        return self.states[kind, tied]

    def __call__(self, kind: str = "gqa", max_shard_size: str = "1GB", tied: bool = False
                 ) -> Path:
        key = (kind, max_shard_size, tied)
        if key not in self.dirs:
            out = self.root / f"hub-{kind}-{max_shard_size}{'-tied' if tied else ''}"
            self.dirs[key] = save_hub(out, self.state(kind, tied), self.args(kind),
                                      self.tokenizers[kind], max_shard_size, tied)
        return self.dirs[key]

    def meta(self, kind: str = "gqa", tied: bool = False, n_shards: int = 1) -> Path:
        """The same weights in Meta's layout."""
        out = self.root / f"meta-{kind}{'-tied' if tied else ''}-mp{n_shards}"
        if not out.exists():
            save_meta(out, self.state(kind, tied), self.args(kind), self.tokenizers[kind],
                      n_shards)
        return out


@pytest.fixture(scope="session")
def code_tokenizer_path(fixture_root):
    return str(train_tokenizer(fixture_root / "code" / "tokenizer.model", CODE_VOCAB,
                               extra_pieces=CODE_VOCAB - 1000))


@pytest.fixture(scope="session")
def hub(fixture_root, checkpoints, tokenizer_path, code_tokenizer_path):
    pytest.importorskip("transformers")
    return Hub(fixture_root / "hub", checkpoints, tokenizer_path, code_tokenizer_path)
