"""The compiled decode step (Llama.compile_decode), and whether it is worth taking here: timed
against the eager step.

torch.compile's decode step (Llama.compile_decode) is faster where a step is many small
operations (small models, GPUs with CUDA graphs) and was slower on the CPU where a step is a
few large bandwidth-bound products (7B int8 at batch 1: docs/REAL_SIZE.md). Both compute the
same tokens, so the choice can be made by the clock: after the compiled step's first call
(which compiles) and the eager step's first, TRIALS steps of each kind are timed alternately,
and the faster kind by median takes the rest of the generation; Llama keeps the verdict for
that batch and cache size, so later calls do not measure again. On GPUs the compiled step is
kept (its CUDA graph removes the launch overhead that dominates there; timing it would need a
synchronisation per step).
"""

import functools
import statistics
from typing import Dict, List, Optional

import torch

from llama.layers import float_linear

TRIALS = 3


class CompiledDecode:
    """The model's forward for one token per row, compiled with static shapes: it writes its
    token's keys at a position held on the device and attends over the whole KV cache of the
    call under a mask, so it compiles once per (batch size, cache size); with `cuda_graphs`
    (default: on a CUDA device) it is captured as a CUDA graph and replayed every step
    (torch.compile's "reduce-overhead" mode). Other options go to torch.compile."""

    def __init__(self, model, cuda_graphs: Optional[bool] = None, **compile_options):
        self.on_gpu = model.output.weight.device.type != "cpu"
        if cuda_graphs is None:
            cuda_graphs = model.output.weight.device.type == "cuda"
        if cuda_graphs:
            compile_options.setdefault("mode", "reduce-overhead")
        compile_options.setdefault("dynamic", False)  # one static graph per shape
        # Traced without inference mode: torch 2.13's inductor fails on views of input tensors
        # traced inside it. The step runs under no_grad instead (__call__), on ordinary
        # (non-inference) tensors: hence the clone there and those of Llama._generate.
        step = functools.partial(type(model).forward.__wrapped__, model)
        torch.compiler.assume_constant_result(float_linear._threads)
        self.function = torch.compile(step, **compile_options)
        self.choices: Dict[tuple, CompiledOrEager] = {}  # per (cache rows, length)

    def __call__(self, tokens, position, cache, pads):
        with torch.inference_mode(False), torch.no_grad():
            return self.function(tokens.clone(), position, cache, pads, last_logits_only=True)

    def choice(self, cache) -> "CompiledOrEager":
        """Compiled or eager steps for this cache's shape, timed once; on GPUs compiled."""
        return self.choices.setdefault((cache.rows, cache.length),
                                       CompiledOrEager(True if self.on_gpu else None))


class CompiledOrEager:
    """The decode steps' choice between the compiled step and the eager one. `next()` says
    which the coming step takes; `took(seconds)` is told how long it took."""

    def __init__(self, verdict: Optional[bool] = None, trials: int = TRIALS):
        self.verdict = verdict  # True: compiled, False: eager, None: not known yet
        self.trials = trials
        self.times: Dict[bool, List[float]] = {True: [], False: []}
        # Each kind's first call is not timed: the compiled one compiles, and the eager one may
        # load what it alone uses (the native attention kernel).
        self._cold = [True, False]
        self._current: Optional[bool] = None

    def next(self) -> bool:
        if self.verdict is not None:
            self._current = None
            return self.verdict
        if self._cold:
            self._current = None
            return self._cold.pop(0)
        # alternate, eager first, so both kinds see the same mix of cache lengths
        self._current = len(self.times[True]) < len(self.times[False])
        return self._current

    def took(self, seconds: float) -> None:
        if self._current is None:
            return
        self.times[self._current].append(seconds)
        if min(len(t) for t in self.times.values()) >= self.trials:
            self.verdict = (statistics.median(self.times[True])
                            <= statistics.median(self.times[False]))
