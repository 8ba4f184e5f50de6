"""Complete four prompts, as Meta's example does.

    python example_text_completion.py                      # the bundled demo model
    torchrun --nproc_per_node 1 example_text_completion.py \
        --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model --max_seq_len 128 --max_batch_size 4
"""

import sys
import time
from typing import Optional

import fire

from llama import Llama
from llama.cli import quiet_other_ranks, resolve_model_paths
from llama.distributed import shutdown


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    verify: bool = False,
    stream: bool = False,
    show_speed: bool = False,
):
    """Prints each prompt, then `> ` and its completion. --stream prints each completion as it
    is generated; --show_speed reports tokens per second on stderr."""
    quiet_other_ranks()
    ckpt_dir, tokenizer_path = resolve_model_paths(ckpt_dir, tokenizer_path)
    generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path,
                            max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                            device=device, dtype=dtype, verify=verify)

    prompts = [
        # For these prompts, the expected answer is the natural continuation of the prompt
        "I believe the meaning of life is",
        "Simply put, the theory of relativity states that ",
        """A brief message congratulating the team on the launch:

        Hi everyone,
        
        I just """,
        # Few shot prompt (providing a few examples before asking model to complete more);
        """Translate English to French:
        
        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
    ]
    start = time.time()
    if stream:
        n_tokens = 0
        for prompt in prompts:
            print(prompt)
            print("> ", end="", flush=True)
            pieces = generator.stream_text(prompt, temperature=temperature, top_p=top_p,
                                           max_gen_len=max_gen_len)
            for piece in pieces:
                print(piece, end="", flush=True)
            n_tokens += len(pieces.tokens)
            print("\n\n==================================\n")
    else:
        results = generator.text_completion(prompts, max_gen_len=max_gen_len,
                                            temperature=temperature, top_p=top_p,
                                            logprobs=show_speed)
        n_tokens = sum(len(result.get("tokens", [])) for result in results)
        for prompt, result in zip(prompts, results):
            print(prompt)
            print(f"> {result['generation']}")
            print("\n==================================\n")
    if show_speed:
        elapsed = time.time() - start
        print(f"{n_tokens} tokens in {elapsed:.2f} s: {n_tokens / elapsed:.1f} tokens/s",
              file=sys.stderr)


if __name__ == "__main__":
    fire.Fire(main)
    shutdown()
