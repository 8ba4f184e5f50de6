"""Answer four dialogs as the assistant, as Meta's example does.

    python example_chat_completion.py                      # the bundled demo model
    torchrun --nproc_per_node 1 example_chat_completion.py \
        --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model --max_seq_len 512 --max_batch_size 4
"""

from typing import List, Optional

from llama import Dialog, Llama
from llama.cli.flags import quiet_other_ranks, resolve_model_paths, run

# Without --ckpt_dir: the demo model rarely ends an answer by itself (see llama.cli.flags.run).
DEMO_DEFAULTS = {"max_gen_len": 64}


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    verify: bool = False,
    quantize: Optional[str] = None,
    group_size: Optional[int] = None,
    kv_cache_dtype: Optional[str] = None,
    activations: Optional[str] = None,
):
    """Answer four dialogs: prints every message as `Role: content`, then `> Assistant: ...`.

    Args:
        ckpt_dir: checkpoint directory, e.g. llama-2-7b-chat/ (default: the bundled demo
            model)
        tokenizer_path: tokenizer.model (default: the one in ckpt_dir or its parent)
        temperature: sampling temperature; 0 always takes the likeliest token
        top_p: sample among the likeliest tokens that add up to this probability
        max_seq_len: most tokens of a dialog and its answer together
        max_batch_size: most dialogs answered together
        max_gen_len: most tokens of an answer (default: as many as max_seq_len leaves)
        device: cpu or cuda (default: cuda if there is a GPU, else cpu)
        dtype: float32, bfloat16 or float16 (default: half precision on a GPU, float32 on
            the CPU)
        verify: check the files' md5 sums against checklist.chk before loading
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

    dialogs: List[Dialog] = [
        [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
        [
            {"role": "user", "content": "I am going to Paris, what should I see?"},
            {
                "role": "assistant",
                "content": """\
Paris, the capital of France, is known for its stunning architecture, art museums, historical landmarks, and romantic atmosphere. Here are some of the top attractions to see in Paris:

1. The Eiffel Tower: The iconic Eiffel Tower is one of the most recognizable landmarks in the world and offers breathtaking views of the city.
2. The Louvre Museum: The Louvre is one of the world's largest and most famous museums, housing an impressive collection of art and artifacts, including the Mona Lisa.
3. Notre-Dame Cathedral: This beautiful cathedral is one of the most famous landmarks in Paris and is known for its Gothic architecture and stunning stained glass windows.

These are just a few of the many attractions that Paris has to offer. With so much to see and do, it's no wonder that Paris is one of the most popular tourist destinations in the world.""",
            },
            {"role": "user", "content": "What is so great about #1?"},
        ],
        [
            {"role": "system", "content": "Always answer with Haiku"},
            {"role": "user", "content": "I am going to Paris, what should I see?"},
        ],
        [
            {"role": "system", "content": "Always answer with emojis"},
            {"role": "user", "content": "How to go from Beijing to NY?"},
        ],
    ]
    results = generator.chat_completion(dialogs, max_gen_len=max_gen_len,
                                        temperature=temperature, top_p=top_p)

    for dialog, result in zip(dialogs, results):
        for msg in dialog:
            print(f"{msg['role'].capitalize()}: {msg['content']}\n")
        print(f"> {result['generation']['role'].capitalize()}: "
              f"{result['generation']['content']}")
        print("\n==================================\n")


if __name__ == "__main__":
    run(main, demo_defaults=DEMO_DEFAULTS)
