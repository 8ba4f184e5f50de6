"""Run by tests under torchrun (or plain python): build from a checkpoint, generate greedily,
and write what rank 0 saw to a JSON file. Optional 4th to 6th arguments: device, dtype,
quantize ("" for the default). `--jobs FILE` instead runs main for each keyword-argument dict
of the JSON list in FILE, in turn, in one process group (tests.conftest.run_workers)."""

import json
import sys

import torch.distributed as dist

from llama import Llama
from llama.checkpoints.meta import full_shapes, shard_shape
from llama.engine.distributed import shutdown

PROMPTS = ["The meaning of life is", "Simply put, the theory of relativity states that ",
           "x", "上下五千年，英雄万万千。"]


def main(ckpt_dir: str, tokenizer_path: str, out_path: str, device=None, dtype=None,
         quantize=None):
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=4,
                            device=device or None, dtype=dtype or None,
                            quantize=quantize or None)
    world = dist.get_world_size()
    completions = generator.text_completion(PROMPTS, temperature=0, max_gen_len=16,
                                            logprobs=True)
    echoed = generator.text_completion(PROMPTS[:2], temperature=0, max_gen_len=4,
                                       logprobs=True, echo=True)
    sampled = generator.text_completion(PROMPTS, temperature=0.8, top_p=0.9, max_gen_len=8)
    stream = generator.stream_text(PROMPTS[3], temperature=0, max_gen_len=16)
    pieces = list(stream)
    shapes_ok = all(
        tuple(tensor.shape) == shard_shape(name, full_shapes(generator.model.params)[name],
                                           world)
        for name, tensor in generator.model.state_dict().items())
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"world": world, "completions": completions, "echoed": echoed,
                       "sampled": sampled, "pieces": pieces, "stream_text": stream.text,
                       "shapes_ok": shapes_ok}, f)
    else:
        # other ranks step through the stream too, but receive no pieces
        assert pieces == [] and stream.text == completions[3]["generation"]


if __name__ == "__main__":
    if sys.argv[1] == "--jobs":  # --jobs FILE
        with open(sys.argv[2]) as f:
            for job in json.load(f):
                main(**job)
    else:
        main(*sys.argv[1:])  # ckpt_dir tokenizer_path out_path [device dtype quantize]
    shutdown()
