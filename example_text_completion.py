"""Complete four prompts, as Meta's example does.

    python example_text_completion.py                      # the bundled demo model
    torchrun --nproc_per_node 1 example_text_completion.py \
        --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model --max_seq_len 128 --max_batch_size 4
"""

import sys
import time
from typing import Optional

from llama import Llama
from llama.cli.flags import quiet_other_ranks, resolve_model_paths, run


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
    quantize: Optional[str] = None,
    group_size: Optional[int] = None,
    kv_cache_dtype: Optional[str] = None,
    activations: Optional[str] = None,
):
    """Complete four prompts: prints each prompt, then `> ` and its completion.

    Args:
        ckpt_dir: checkpoint directory, e.g. llama-2-7b/ (default: the bundled demo model)
        tokenizer_path: tokenizer.model (default: the one in ckpt_dir or its parent)
        temperature: sampling temperature; 0 always takes the likeliest token
        top_p: sample among the likeliest tokens that add up to this probability
        max_seq_len: most tokens of a prompt and its completion together
        max_gen_len: most tokens generated for each prompt
        max_batch_size: most prompts generated together
        device: cpu or cuda (default: cuda if there is a GPU, else cpu)
        dtype: float32, bfloat16 or float16 (default: half precision on a GPU, float32 on
            the CPU)
        verify: check the files' md5 sums against checklist.chk before loading
        stream: print each completion as it is generated
        show_speed: report tokens per second on stderr
        quantize: int8 or int4: store the weights in 8 or 4 bits, quantized while loading
            (less memory, faster decoding); none keeps the checkpoint's precision
        group_size: int4 only: input columns per scale, 32, 64 or 128 (default: 32)
        kv_cache_dtype: bfloat16 halves the KV cache (default: the activations' dtype);
            long conversations then decode faster on the CPU
        activations: int8, with --quantize int8 or int4: round activations to int8 too (faster
            prompts on AVX-512 VNNI CPUs, a coarser rounding; default: int16 per token)
    """
    quiet_other_ranks()
    ckpt_dir, tokenizer_path = resolve_model_paths(ckpt_dir, tokenizer_path)
    generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path,
                            max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                            device=device, dtype=dtype, verify=verify, quantize=quantize,
                            group_size=group_size,
                            kv_cache_dtype=kv_cache_dtype, activations=activations)

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
    run(main)
