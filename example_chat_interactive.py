"""Chat with a model in the terminal; answers stream as they are generated.

    python example_chat_interactive.py --system "Answer briefly"        # the bundled demo model
    torchrun --nproc_per_node 2 example_chat_interactive.py --ckpt_dir llama-2-13b-chat/ \
        --tokenizer_path tokenizer.model

Commands: /reset forgets the conversation (keeps the system prompt), /exit or Ctrl-D quits;
other /words are refused (// sends a message that starts with /). An answer cut by
--max_gen_len ends with [cut ...].
Ctrl-C while an answer is written stops that answer and keeps the conversation; Ctrl-C at the
prompt interrupts the chat (exit status 130, as for any command stopped by Ctrl-C; every
process stops under torchrun). The conversation stays in the KV cache between turns
(Llama.chat_session): each answer starts after prefilling only the new message. When the
conversation outgrows max_seq_len, the oldest exchanges are dropped, and it says so.
"""

import contextlib
import sys
import time
from json import load as load_json
from typing import Optional

from llama import Llama
from llama.cli.flags import is_rank0, quiet_other_ranks, resolve_model_paths, run
from llama.cli.keyboard import Keyboard
from llama.engine.distributed import broadcast_object
from llama.engine.validation import ArgumentValueError

# Without --ckpt_dir: the demo model was trained on 256-token contexts and rarely ends an
# answer by itself (see llama.cli.flags.run).
DEMO_DEFAULTS = {"max_seq_len": 256, "max_gen_len": 64}


def read_user_turn(keyboard: Optional[Keyboard]) -> Optional[str]:
    """Rank 0 reads a line; every rank gets it. None means quit (Ctrl-D). Ctrl-C raises
    KeyboardInterrupt on every rank (rank 0 tells the others first, so none waits for a line
    that never comes); `run` then exits with status 130."""
    interrupted = False
    try:
        line = keyboard.read_line("User: ") if keyboard else None
    except KeyboardInterrupt:
        line, interrupted = None, True
    line, interrupted = broadcast_object((line, interrupted))
    if interrupted:
        raise KeyboardInterrupt
    return line


def stream_answer(session, line: str, keyboard: Optional[Keyboard], **options):
    """Print the answer as it is generated; returns (the turn, whether Ctrl-C stopped it).
    Rank 0 reads the key after each token and every rank stops there. Raises
    ArgumentValueError, before printing anything, if the message cannot fit."""
    with keyboard.answering() if keyboard else contextlib.nullcontext(lambda: False) as pressed:
        answer = session.stream(line, cancel=pressed, **options)
        if answer.dropped:
            print(f"(dropped the {answer.dropped} oldest messages to fit the context)",
                  flush=True)
        print("Assistant: ", end="", flush=True)
        for piece in answer:
            print(piece, end="", flush=True)
    stopped = answer.finish_reason == "cancelled"
    if stopped:
        print(" [stopped]", end="", flush=True)
    elif answer.finish_reason == "length":  # cut, not finished: say so
        print(" [cut: --max_gen_len or --max_seq_len reached]", end="", flush=True)
    print(flush=True)
    return answer, stopped


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
    quantize: Optional[str] = None,
    group_size: Optional[int] = None,
    kv_cache_dtype: Optional[str] = None,
    activations: Optional[str] = None,
    json: bool = False,
    schema: Optional[str] = None,
):
    """Chat in the terminal; answers are printed as they are generated.

    Ctrl-C stops an answer and keeps the conversation; /exit or Ctrl-D at the prompt quits
    (Ctrl-C there interrupts: exit status 130); /reset starts the conversation over (keeping
    the system prompt).

    Args:
        ckpt_dir: checkpoint directory, e.g. llama-2-7b-chat/ (default: the bundled demo
            model)
        tokenizer_path: tokenizer.model (default: the one in ckpt_dir or its parent)
        system: a system prompt, e.g. "Answer briefly" (default: none)
        temperature: sampling temperature; 0 always takes the likeliest token
        top_p: sample among the likeliest tokens that add up to this probability
        max_seq_len: most tokens of the conversation and an answer (older messages are
            dropped to fit)
        max_gen_len: most tokens of an answer (default: as many as max_seq_len leaves)
        device: cpu or cuda (default: cuda if there is a GPU, else cpu)
        dtype: float32, bfloat16 or float16 (default: half precision on a GPU, float32 on
            the CPU)
        seed: seed of the random numbers used for sampling
        show_speed: report each answer's tokens per second on stderr
        quantize: int8 or int4: store the weights in 8 or 4 bits, quantized while loading
            (less memory, faster decoding); none keeps the checkpoint's precision
        group_size: int4 only: input columns per scale, 32, 64 or 128 (default: 32)
        kv_cache_dtype: bfloat16 halves the KV cache (default: the activations' dtype);
            long conversations then decode faster on the CPU
        activations: int8, with --quantize int8 or int4: round activations to int8 too (faster
            prompts on AVX-512 VNNI CPUs, a coarser rounding; default: int16 per token)
        json: every answer is a JSON object (constrained decoding; say in the system prompt
            what it should hold)
        schema: a JSON schema file every answer must match (constrained decoding)
    """
    # Keep room for an answer: the prompt may use what is left after it.
    reply_room = max_gen_len or max(16, max_seq_len // 4)
    if reply_room >= max_seq_len:
        if max_gen_len:
            raise ArgumentValueError("max_gen_len", f"max_gen_len ({max_gen_len}) must be below "
                                                    f"max_seq_len ({max_seq_len}), to leave "
                                                    f"room for the conversation")
        raise ArgumentValueError("max_seq_len", f"max_seq_len ({max_seq_len}) leaves no room "
                                                f"for a conversation and a {reply_room}-token "
                                                f"answer: make it larger")
    quiet_other_ranks()
    ckpt_dir, tokenizer_path = resolve_model_paths(ckpt_dir, tokenizer_path)
    generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path,
                            max_seq_len=max_seq_len, max_batch_size=1, device=device,
                            dtype=dtype, seed=seed, quantize=quantize,
                            group_size=group_size,
                            kv_cache_dtype=kv_cache_dtype, activations=activations)
    response_format = {"type": "json_object"} if json else None
    if schema:
        with open(schema) as file:
            response_format = {"type": "json_schema",
                               "json_schema": {"name": "answer", "schema": load_json(file)}}
    session = generator.chat_session(system=system, reply_room=reply_room)
    print("Chatting. /reset starts over, /exit or Ctrl-D quits; Ctrl-C stops an answer.",
          flush=True)
    keyboard = Keyboard() if is_rank0() else None
    try:
        while True:
            line = read_user_turn(keyboard)
            if line is None or line.strip() == "/exit":
                print("Bye.", flush=True)
                break
            if line.strip() == "/reset":
                session.reset()
                print("(conversation reset)", flush=True)
                continue
            if line.startswith("//"):  # a message that starts with "/"
                line = line[1:]
            elif line.startswith("/"):
                print(f"(unknown command {line.split()[0]}: /reset starts over, /exit quits; "
                      f"begin with // to send a message starting with /)", flush=True)
                continue
            if not line.strip():
                continue
            # bytes that are not UTF-8 (read with surrogateescape) become U+FFFD, as on a
            # terminal, rather than ending the chat
            line = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            answer_start = time.time()
            try:
                # every rank keeps the same session: each computes the same tokens
                answer, stopped = stream_answer(session, line, keyboard,
                                                temperature=temperature, top_p=top_p,
                                                max_gen_len=max_gen_len,
                                                response_format=response_format)
            except ArgumentValueError as error:
                if error.param != "content":
                    raise
                print(f"(that message is too long: with the system prompt it must fit in "
                      f"{max_seq_len - reply_room} tokens; raise --max_seq_len)", flush=True)
                continue
            if show_speed and is_rank0() and not stopped:
                seconds = time.time() - answer_start
                print(f"({len(answer.tokens)} tokens, {len(answer.tokens) / seconds:.1f} "
                      f"tokens/s, {answer.prefilled} prompt tokens prefilled)",
                      file=sys.stderr, flush=True)
    finally:
        if keyboard:
            keyboard.close()


if __name__ == "__main__":
    run(main, demo_defaults=DEMO_DEFAULTS)
