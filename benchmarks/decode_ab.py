"""Decode steps of two weight formats in one process, taking turns round by round, so that a
shared machine's drift (its memory's rate moves by up to 2x between minutes here) falls on
both alike. real_size.py and vs_llamacpp.py run each format in a process of its own, minutes
apart; this is for ratios between formats that are close.

    python -m benchmarks.decode_ab --ckpt ~/rs/7B --formats int4 w4a8 --rows 1 4 --rounds 4

Both models are held at once (7B: int4 + int4 with int8 activations ~9 GiB, int8 + int8 with
int8 activations ~14 GiB). Per round and row count: a --prompt-len prefill of random tokens,
then the median of --steps one-token decode steps, for each format in turn. Prints the
milliseconds per step and the first format's over the second's, round by round.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.real_size import FORMATS
from llama import Llama


def step_ms(llama: Llama, rows: int, prompt: torch.Tensor, steps: int) -> float:
    """The median milliseconds of `steps` decode steps of `rows` rows after `prompt`."""
    model = llama.model
    cache = model.new_cache(rows, prompt.shape[1] + steps)
    with torch.inference_mode():
        model.forward(prompt.expand(rows, -1).contiguous(), 0, cache)
        token = torch.full((rows, 1), 5)
        times = []
        for s in range(steps):
            began = time.perf_counter()
            model.forward(token, prompt.shape[1] + s, cache)
            times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_ab",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a checkpoint in Meta's "
                        "layout with its tokenizer.model (real_size.py --write)")
    parser.add_argument("--formats", nargs=2, choices=sorted(FORMATS), required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompt-len", type=int, default=128)
    a = parser.parse_args(argv)
    ckpt = a.ckpt.expanduser()
    length = a.prompt_len + a.steps
    models = [Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=length,
                          max_batch_size=max(a.rows), verbose=False, **FORMATS[name])
              for name in a.formats]
    vocab = models[0].model.params.vocab_size
    prompt = torch.randint(3, vocab, (1, a.prompt_len),
                           generator=torch.Generator().manual_seed(0))
    first, second = a.formats
    print(f"{ckpt}: ms per decode step, median of {a.steps}, after a {a.prompt_len}-token "
          f"prompt; {torch.get_num_threads()} threads\n")
    print(f"| rows | round | {first} | {second} | {first} / {second} |\n|---|---|---|---|---|")
    for rows in a.rows:
        for round_ in range(1, a.rounds + 1):
            ms = [step_ms(llama, rows, prompt, a.steps) for llama in models]
            print(f"| {rows} | {round_} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[0] / ms[1]:.2f} |",
                  flush=True)
    print("\npython -m benchmarks.decode_ab --ckpt", a.ckpt, "--formats", *a.formats, "--rows",
          *a.rows, "--rounds", a.rounds, "--steps", a.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
