"""The programs benchmarks/bench.py times against each other on the same checkpoint: this
library, the reference algorithm restated in tests/meta_reference.py, Meta's own model code from
a checkout of its repository, and Hugging Face transformers. Each loads the checkpoint and
generates greedily from token ids: `generate(prompt_tokens, n)` -> n new tokens per prompt."""

import importlib.util
import json
from pathlib import Path
from unittest import mock

import torch

from benchmarks.shapes import VOCAB, NoEosTokenizer
from llama.model import ModelArgs
from llama.quantize.formats import DEFAULT_GROUP_SIZE


class Ours:
    name = "this library"
    against_ours = False  # True: figures given as x float (our float model's in the same turns)

    def __init__(self, ckpt, device, dtype, max_seq_len, max_batch_size, compile_decode,
                 quantize=None, group_size=None):
        from llama.generation import Llama
        from llama.loading import LoadOptions, load_model

        model = load_model(str(ckpt), VOCAB, max_seq_len, max_batch_size, LoadOptions(
            device=device, dtype=dtype, verbose=False, quantize=quantize,
            group_size=group_size if quantize == "int4" else None))
        self.llama = Llama(model, NoEosTokenizer())
        if quantize:
            self.name = quantize + (f" g{group_size or DEFAULT_GROUP_SIZE}"
                                    if quantize == "int4" else "")
            self.against_ours = True
        if compile_decode:
            self.llama.compile_decode()

    def weight_bytes(self) -> int:
        """Bytes of the weights one decode step reads: every product's (packed or float)."""
        model = self.llama.model
        weights = [model.output.weight]
        for layer in model.layers:
            weights += [layer.attention.wqkv, layer.attention.wo.weight, layer.feed_forward.w13,
                        layer.feed_forward.w2.weight]
        return sum(w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes
                   for w in weights)

    def generate(self, prompt_tokens, n):
        return self.llama.generate(prompt_tokens, n, temperature=0)[0]


class Reference:
    name = "reference algorithm"

    def __init__(self, ckpt, device, dtype, max_seq_len, max_batch_size, compile_decode):
        from tests.meta_reference import ReferenceModel

        state = torch.load(ckpt / "consolidated.00.pth", mmap=True, weights_only=True)
        params = json.loads((ckpt / "params.json").read_text())
        self.model = ReferenceModel(state, params, max_batch_size, max_seq_len)

    def generate(self, prompt_tokens, n):
        from tests.meta_reference import reference_generate

        return reference_generate(self.model, prompt_tokens, n, eos_id=-1)[0]


class MetaOriginal:
    name = "Meta's model code"

    def __init__(self, meta_repo, ckpt, max_seq_len, max_batch_size):
        from llama.engine.distributed import init_process_groups

        source = Path(meta_repo).expanduser() / "llama" / "model.py"
        if not source.exists():
            raise SystemExit(f"--meta {meta_repo}: no llama/model.py there; give the path of a "
                             f"checkout of github.com/meta-llama/llama")
        spec = importlib.util.spec_from_file_location("meta_llama_model", source)
        meta = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(meta)
        init_process_groups(torch.device("cpu"), 1)
        params = json.loads((ckpt / "params.json").read_text())
        params["vocab_size"] = VOCAB
        args = meta.ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params)
        # its caches are created with .cuda(); on the CPU they stay where they are
        with mock.patch.object(torch.Tensor, "cuda", lambda tensor, *a, **k: tensor):
            self.model = meta.Transformer(args)
        state = torch.load(ckpt / "consolidated.00.pth", mmap=True, weights_only=True)
        self.model.load_state_dict(state, strict=False)  # as Meta's Llama.build does
        self.max_seq_len = max_seq_len

    def forward(self, tokens, start_pos):
        return self.model.forward(tokens, start_pos)

    @torch.inference_mode()
    def generate(self, prompt_tokens, n):
        from tests.meta_reference import reference_generate

        return reference_generate(self, prompt_tokens, n, eos_id=-1)[0]


class HuggingFace:
    name = "transformers"

    def __init__(self, ckpt, device, dtype, max_seq_len, max_batch_size, compile_decode):
        from llama.hf.bridge import hf_model

        state = torch.load(ckpt / "consolidated.00.pth", mmap=True, weights_only=True)
        params = json.loads((ckpt / "params.json").read_text())
        params.pop("vocab_size")
        args = ModelArgs(vocab_size=VOCAB, max_seq_len=max_seq_len, **params)
        self.model = hf_model(state, args, getattr(torch, dtype), device)
        self.device = device

    @torch.inference_mode()
    def generate(self, prompt_tokens, n):
        # left-padded batch with an attention mask, as transformers expects for generation
        width = max(len(p) for p in prompt_tokens)
        ids = torch.zeros((len(prompt_tokens), width), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_tokens):
            ids[i, width - len(p):] = torch.tensor(p, device=self.device)
            mask[i, width - len(p):] = 1
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[:, width:].tolist()
