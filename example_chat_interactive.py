"""Chat with a model in the terminal; answers stream as they are generated.

    python example_chat_interactive.py --system "Answer briefly"        # the bundled demo model
    torchrun --nproc_per_node 2 example_chat_interactive.py --ckpt_dir llama-2-13b-chat/ \
        --tokenizer_path tokenizer.model

Commands: /reset forgets the conversation (keeps the system prompt), /exit or Ctrl-D quits.
When the conversation outgrows max_seq_len, the oldest exchanges are dropped, and it says so.
"""

import sys
import time
from typing import Optional

import fire

from llama import Llama
from llama.chat_format import truncate_dialog
from llama.cli import is_rank0, quiet_other_ranks, resolve_model_paths
from llama.distributed import broadcast_object, shutdown


def read_user_turn() -> Optional[str]:
    """Rank 0 reads a line; every rank gets it. None means quit (Ctrl-D)."""
    line = None
    if is_rank0():
        try:
            line = input("User: ")
        except (EOFError, KeyboardInterrupt):
            print()
            line = None
    return broadcast_object(line)


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    system: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_gen_len: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    seed: int = 1,
    show_speed: bool = False,
):
    """--show_speed reports each answer's tokens per second on stderr."""
    quiet_other_ranks()
    ckpt_dir, tokenizer_path = resolve_model_paths(ckpt_dir, tokenizer_path)
    generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path,
                            max_seq_len=max_seq_len, max_batch_size=1, device=device,
                            dtype=dtype, seed=seed)
    encode = generator.tokenizer.encode
    system_turn = [{"role": "system", "content": system}] if system else []
    # Keep room for an answer: the prompt may use what is left after it.
    reply_room = max_gen_len or max(16, max_seq_len // 4)
    if reply_room >= max_seq_len:
        raise SystemExit(f"max_gen_len ({max_gen_len}) must be below max_seq_len ({max_seq_len})")
    print("Chatting. /reset starts over, /exit or Ctrl-D quits.", flush=True)
    history = list(system_turn)
    while True:
        line = read_user_turn()
        if line is None or line.strip() == "/exit":
            print("Bye.", flush=True)
            break
        if line.strip() == "/reset":
            history = list(system_turn)
            print("(conversation reset)", flush=True)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        fitted = truncate_dialog(history, encode, max_seq_len - reply_room)
        if fitted is None:
            history.pop()
            print(f"(that message is too long: with the system prompt it must fit in "
                  f"{max_seq_len - reply_room} tokens; raise --max_seq_len)", flush=True)
            continue
        if len(fitted) < len(history):
            print(f"(dropped the {len(history) - len(fitted)} oldest messages to fit "
                  f"max_seq_len={max_seq_len})", flush=True)
            history = fitted
        print("Assistant: ", end="", flush=True)
        answer_start = time.time()
        answer = generator.stream_chat(history, temperature=temperature, top_p=top_p,
                                       max_gen_len=max_gen_len)
        for piece in answer:
            print(piece, end="", flush=True)
        print(flush=True)
        if show_speed and is_rank0():
            seconds = time.time() - answer_start
            print(f"({len(answer.tokens)} tokens, {len(answer.tokens) / seconds:.1f} tokens/s)",
                  file=sys.stderr, flush=True)
        history.append({"role": "assistant", "content": answer.text})


if __name__ == "__main__":
    fire.Fire(main)
    shutdown()
