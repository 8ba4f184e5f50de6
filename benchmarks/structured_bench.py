"""What constrained decoding costs: decode tok/s with and without a JSON schema, with 1 and 8
rows decoding at once (the server's engine, as if 1 or 8 clients), and the mask work's share of
a step (llama/engine/logits.py: llguidance's masks, applying them, taking the token).

    python -m benchmarks.structured_bench --shape S            # rows 1 8, 128 tokens a row
    python -m benchmarks.structured_bench --quick              # a smoke run on the tiny shape

The model is serve_bench's random-weight checkpoint of the shape with its 32000-piece
tokenizer (built once under bench_out/). Each row samples (temperature 1) a prompt's answer;
a row that ends is replaced by a new one at once, as a client sends its next request, so the
batch stays full. Variants take turns, round after round, so a busy spell of a shared machine
hits them alike; figures are medians over rounds.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.serve_clients import REPO, model_files
from llama.checkpoints.fixtures import python_docs_text
from llama.constrained.grammar import GrammarSpec, vocabulary
from llama.constrained.spec import make_constraint
from llama.engine import core as engine_module
from llama.engine.core import Engine, EngineSequence
from llama.engine.sampling import RowNoise
from llama.generation import Llama

SCHEMA = {"type": "object",
          "properties": {"title": {"type": "string"},
                         "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}},
                         "author": {"type": "object",
                                    "properties": {"name": {"type": "string"},
                                                   "email": {"type": "string",
                                                             "pattern": "^[a-z]+@[a-z]+$"}},
                                    "required": ["name"]}},
          "required": ["title", "year", "tags", "author"]}


class MaskClock:
    """Seconds spent in the engine's logits hooks (masks in, tokens out), by wrapping them."""

    def __init__(self):
        self.seconds = 0.0
        for name in ("constrain_logits", "take_constrained"):
            original = getattr(engine_module, name)
            setattr(engine_module, name, self._timed(original))

    def _timed(self, function):
        def timed(*args):
            start = time.perf_counter()
            function(*args)
            self.seconds += time.perf_counter() - start
        return timed


def run_round(llama, rows: int, tokens: int, spec, prompts, clock: MaskClock, seed: int):
    """Decode `tokens` tokens in all with `rows` rows kept busy; returns (tok/s, mask share,
    answers finished)."""
    model, tokenizer = llama.model, llama.tokenizer
    engine = Engine(model, tokenizer.eos_id, model.new_cache(rows, 512), release_finished=True)
    vocab_size = model.params.vocab_size
    made = [0]

    def new_sequence():
        made[0] += 1
        seq = EngineSequence(prompt=prompts[made[0] % len(prompts)], limit=96, temperature=1.0,
                       top_p=1.0, noise=RowNoise(seed + made[0], vocab_size, engine.device))
        if spec is not None:
            seq.constraint = make_constraint(tokenizer, vocab_size, spec, seq.limit)
        return seq

    for _ in range(rows):
        engine.add(new_sequence())
    generated = finished = 0
    clock.seconds = 0.0
    decoding = 0.0
    while generated < tokens:
        before = {id(seq): len(seq.tokens) for seq in engine.sequences}
        start = time.perf_counter()
        stepped = engine.step()
        decoding += time.perf_counter() - start
        generated += sum(len(seq.tokens) - before[id(seq)] for seq in stepped)
        for seq in stepped:
            if seq.finished:
                finished += 1
                engine.add(new_sequence())  # (prefill, outside the decode timing)
    return generated / decoding, clock.seconds / decoding, finished


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="S")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=128, help="tokens per row per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", type=Path, default=REPO / "bench_out")
    parser.add_argument("--quick", action="store_true", help="tiny shape, few tokens")
    args = parser.parse_args()
    if args.quick:
        args.shape, args.tokens, args.rounds = "tiny", 24, 1
    torch.set_num_threads(args.threads)
    ckpt, tokenizer_path = model_files(args.shape, args.root)
    llama = Llama.build(str(ckpt), str(tokenizer_path), 512, max(args.rows), device="cpu",
                        verbose=False)
    llama.model.use_native_kernels()  # as the server runs it
    tokenizer = llama.tokenizer
    text = tokenizer.encode(python_docs_text(), bos=False, eos=False)
    prompts = [[tokenizer.bos_id] + text[i * 997: i * 997 + 32] for i in range(16)]

    start = time.perf_counter()
    vocab = vocabulary(tokenizer, llama.model.params.vocab_size)
    built = time.perf_counter() - start
    spec = GrammarSpec.json_schema(SCHEMA)
    start = time.perf_counter()
    make_constraint(tokenizer, llama.model.params.vocab_size, spec, 96)
    first = time.perf_counter() - start
    start = time.perf_counter()
    make_constraint(tokenizer, llama.model.params.vocab_size, spec, 96)
    cached = time.perf_counter() - start
    print(f"shape {args.shape}, vocabulary {vocab.n_vocab}, {args.threads} threads")
    print(f"vocabulary for llguidance: {built * 1e3:.0f} ms (once per tokenizer); schema "
          f"compiled {first * 1e3:.1f} ms, then from the cache {cached * 1e3:.2f} ms")

    clock = MaskClock()
    results = {(rows, kind): [] for rows in args.rows for kind in ("free", "schema")}
    for round_ in range(args.rounds):
        for rows in args.rows:
            for kind in ("free", "schema"):
                results[rows, kind].append(run_round(
                    llama, rows, args.tokens * rows, spec if kind == "schema" else None,
                    prompts, clock, seed=round_ * 1000))
    print(f"\n{'rows':>4} {'free tok/s':>11} {'schema tok/s':>13} {'ratio':>6} "
          f"{'mask share':>11} {'answers':>8}")
    for rows in args.rows:
        free = statistics.median(r[0] for r in results[rows, "free"])
        schema = statistics.median(r[0] for r in results[rows, "schema"])
        share = statistics.median(r[1] for r in results[rows, "schema"])
        answers = sum(r[2] for r in results[rows, "schema"])
        print(f"{rows:>4} {free:>11.1f} {schema:>13.1f} {schema / free:>6.2f} "
              f"{share * 100:>10.1f}% {answers:>8}")


if __name__ == "__main__":
    main()
