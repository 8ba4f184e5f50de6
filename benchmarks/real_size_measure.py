"""One weight format's figures, measured in the process that loads it (benchmarks/real_size.py
runs this in a child process per format, so that each peak RSS is the format's own).

Everything goes through the public API as a user's program would: Llama.build with the
format's arguments, generate for prefill and decode, chat_completion for a growing dialog,
and Llama.chat_session where the library has it.
"""

import resource
import statistics
import time
from pathlib import Path

import torch

from llama.chat_format import dialog_to_tokens
from llama.checkpoints.memory import weight_bytes
from llama.layers.cache import KVCache


def measure_format(ckpt: Path, fmt: str, build: dict, a, say=print) -> dict:
    """The figures of Llama.build(ckpt, **build), or why it refused ("not_run"). `a`: the
    options of benchmarks/real_size.py (threads, batch, lengths, turns, runs)."""
    from llama import Llama

    torch.set_num_threads(a.threads)
    out = {"format": fmt, "build": {k: str(v) for k, v in build.items()},
           "prompt_len": a.prompt_len, "gen_len": a.gen_len}
    start = time.perf_counter()
    try:
        llama = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), a.max_seq_len,
                            max(a.batch), device="cpu", verbose=False, **build)
    except (MemoryError, ValueError, RuntimeError) as error:  # e.g. its memory check
        return {**out, "not_run": f"Llama.build refused: {type(error).__name__}: {error}"}
    out["load_s"] = time.perf_counter() - start
    out["peak_rss_load"] = peak_rss()
    if a.native_kernels:
        llama.model.use_native_kernels()
    model, vocab = llama.model, llama.tokenizer.n_words
    embedding = model.tok_embeddings.weight
    # A decode step reads every product's weights once; of the embedding, one row per token.
    out["weight_dtype"] = str(embedding.dtype).replace("torch.", "")
    out["weights_per_step"] = (weight_bytes(model.params, build.get("quantize"),
                                            dtype=embedding.dtype)
                               - embedding.numel() * embedding.element_size())
    out["kv_per_token"] = KVCache.bytes_per_token(model.params, model.norm.weight.dtype)
    llama.generate(random_prompts(1, 8, vocab, seed=99), 2, temperature=0)  # warm-up

    # Prefill: one prompt, one token
    prompt = random_prompts(1, a.prompt_len, vocab, seed=0)
    prefill = [seconds(llama.generate, prompt, 1, temperature=0)[0] for _ in range(a.runs)]
    out["prefill_tok_s"] = a.prompt_len / statistics.median(prefill)
    say(f"loaded in {out['load_s']:.1f} s; prefill {out['prefill_tok_s']:.1f} tok/s")

    # Decode: each run's generation of gen_len tokens less the same batch's first token,
    # timed before and after it (the shorter: a busy spell only lengthens a call)
    out["decode_tok_s"] = {}
    for bsz in a.batch:
        prompts = random_prompts(bsz, a.prompt_len, vocab, seed=bsz)
        rates = []
        for _ in range(a.runs):
            before, _ = seconds(llama.generate, prompts, 1, temperature=0)
            whole, (tokens, _) = seconds(llama.generate, prompts, a.gen_len, temperature=0)
            after, _ = seconds(llama.generate, prompts, 1, temperature=0)
            # tokens after each row's first; a row that met EOS counts what it made
            made = sum(len(row) for row in tokens) - bsz
            decoding = whole - min(before, after)
            if made > 0 and decoding > 0:
                rates.append(made / decoding)
        # None: too short to time on this machine (a longer --gen-len will do)
        rate = statistics.median(rates) if rates else None
        out["decode_tok_s"][str(bsz)] = rate
        say(f"decode batch {bsz}: " + (f"{rate:.2f} tok/s" if rate else "too short to time"))
    llama.free_cache()  # the chat's calls need one row, longer

    if a.turns:
        users, answers = chat_texts(llama.tokenizer, a.turns, a.turn_tokens, a.answer_tokens)
        out["chat_completion"] = chat_completion_turns(llama, users, answers)
        say("chat_completion, time to first token by turn: "
            + seconds_list(out["chat_completion"]["ttft_s"]))
        llama.free_cache()
        if hasattr(llama, "chat_session"):
            out["chat_session"] = session_turns(llama, users, a.answer_tokens)
            say("chat_session, time to first token by turn: "
                + seconds_list(out["chat_session"]["ttft_s"]))
    out["peak_rss"] = peak_rss()
    return out


def chat_completion_turns(llama, users, answers) -> dict:
    """Turn by turn, chat_completion of the dialog so far (one token: the time to the first),
    then the fixed answer joins the dialog: the same prompts for every format."""
    dialog, turns = [], {"prompt_tokens": [], "ttft_s": []}
    for user, answer in zip(users, answers):
        dialog.append({"role": "user", "content": user})
        turns["prompt_tokens"].append(len(dialog_to_tokens(dialog, llama.tokenizer.encode)))
        turns["ttft_s"].append(seconds(llama.chat_completion, [dialog], temperature=0,
                                       max_gen_len=1)[0])
        dialog.append({"role": "assistant", "content": answer})
    return turns


def session_turns(llama, users, answer_tokens: int) -> dict:
    """Turn by turn, a chat session's streamed greedy answer of answer_tokens: the time to its
    first text piece, and the prompt tokens it held and prefilled."""
    # room for one answer only: no exchange is dropped while the chat fits max_seq_len
    session = llama.chat_session(reply_room=answer_tokens + 8)
    turns = {"prompt_tokens": [], "prefilled_tokens": [], "ttft_s": []}
    for user in users:
        turn = session.stream(user, temperature=0, max_gen_len=answer_tokens)
        turns["ttft_s"].append(first_piece_seconds(turn))
        if getattr(turn, "dropped", 0):
            raise SystemExit("the chat session dropped a turn: max_seq_len is too small")
        turns["prompt_tokens"].append(len(getattr(turn, "prompt_tokens", None) or []))
        turns["prefilled_tokens"].append(getattr(turn, "prefilled", None))
    return turns


def chat_texts(tokenizer, turns: int, turn_tokens: int, answer_tokens: int):
    """(user messages, assistant answers): windows of Python's documentation of about the
    given token counts, brackets made parentheses (no chat-format tags)."""
    from llama.checkpoints.fixtures import python_docs_text

    text = tokenizer.encode(python_docs_text()[:400_000], bos=False, eos=False)
    step = len(text) // (2 * turns + 1)

    def window(i, length):
        return tokenizer.decode(text[i * step: i * step + length]).replace("[", "(")

    return ([window(2 * i + 1, turn_tokens) for i in range(turns)],
            [window(2 * i + 2, answer_tokens) for i in range(turns)])


def chat_length(tokenizer, turns: int, turn_tokens: int, answer_tokens: int) -> int:
    """Tokens the chat's longest call holds: the last turn's prompt (the fixed answers
    replayed) and its answer, with room for a session's own answers' EOS and re-encoding."""
    if turns == 0:
        return 0
    users, answers = chat_texts(tokenizer, turns, turn_tokens, answer_tokens)
    dialog = [{"role": role, "content": text} for pair in zip(users, answers)
              for role, text in zip(("user", "assistant"), pair)][:-1]
    return len(dialog_to_tokens(dialog, tokenizer.encode)) + answer_tokens + 8 * turns


def random_prompts(rows: int, length: int, vocab: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (length - 1,), generator=generator).tolist()
            for _ in range(rows)]


def peak_rss() -> int:
    """This process's peak resident set (VmHWM), bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def seconds(fn, *args, **kwargs):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def first_piece_seconds(pieces) -> float:
    """Seconds to an iterator's first text piece; the rest is drained."""
    start, first = time.perf_counter(), None
    for _ in pieces:
        first = first if first is not None else time.perf_counter() - start
    return first if first is not None else time.perf_counter() - start


def seconds_list(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values) + " s"
