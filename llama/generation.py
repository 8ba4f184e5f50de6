"""Llama: build a model from Meta's files, then complete text and chats (as lists or streams).

One decode loop (`Llama._generate`) serves every API. Prompts of different lengths are
left-padded and prefilled in one forward pass; each step then samples one token per row,
feeds it back, and syncs with the host once, to decide whether every row is done.
"""

import functools
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Literal, Optional, Sequence, Tuple, TypedDict

import torch

from llama.chat_format import (
    UNSAFE_ERROR,
    Dialog,
    Message,
    dialog_to_tokens,
    has_special_tags,
    validate_dialog,
)
from llama.distributed import is_main_process
from llama.loading import check_build_arguments, load_model
from llama.model import KVCache, Transformer
from llama.tokenizer import Tokenizer
from llama.validation import (
    ArgumentError,
    ArgumentTypeError,
    ArgumentValueError,
    check_int,
    check_stop,
    check_temperature,
    check_top_p,
)

FinishReason = Literal["stop", "length"]


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required
    finish_reason: FinishReason


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required
    finish_reason: FinishReason


@dataclass
class _Row:
    """One prompt's generation, as it is built up."""
    prompt: List[int]
    limit: int  # tokens this row may generate (max_gen_len, or what is left of max_seq_len)
    tokens: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    text: Optional[str] = None  # decoded text, kept only when streaming or checking stops
    settled: int = 0  # tokens whose text can no longer change (see _extend_text)
    settled_text: str = ""  # their text
    emitted: int = 0  # characters of `text` already streamed
    stopped_by: Optional[str] = None  # the stop string found, if any
    finish_reason: FinishReason = "length"


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Optional[str] = None,
        dtype=None,
        verify: bool = False,
        verbose: bool = True,
    ) -> "Llama":
        """Load a checkpoint directory (params.json + consolidated.NN.pth) and a tokenizer.

        Runs as a plain process or under torchrun; the checkpoint's shard count need not equal
        the number of processes (shards are split or merged while loading). `device` defaults
        to CUDA when available, else the CPU; `dtype` to bfloat16/float16 on GPUs and float32
        on the CPU. `verify=True` checks every file against checklist.chk first. `seed` must be
        the same on every rank: all ranks sample the same tokens. Every argument, the
        checkpoint directory and then the tokenizer file are checked before anything is loaded.
        """
        check_build_arguments(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size,
                              model_parallel_size, seed, device, dtype, verify, verbose)
        try:
            tokenizer = Tokenizer(model_path=tokenizer_path)
        except ArgumentError as error:  # named as this caller knows it
            message = "tokenizer_path" + str(error)[len(error.param):]
            raise type(error)("tokenizer_path", message) from None
        model = load_model(ckpt_dir, tokenizer.n_words, max_seq_len, max_batch_size,
                           model_parallel_size, seed, device, dtype, verify, verbose)
        return Llama(model, tokenizer)

    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._cache: Optional[KVCache] = None
        self._compiled_step = None  # see compile_decode

    def compile_decode(self, cuda_graphs: Optional[bool] = None, **compile_options) -> None:
        """Compile the one-token decode step with torch.compile. The compiled step has static
        shapes: it writes its token's keys at a position held on the device and attends over
        the whole KV cache of the call under a mask, so it compiles once per (batch size,
        cache size) and, with `cuda_graphs` (default: on when the model is on a CUDA device),
        is captured as a CUDA graph and replayed every step (torch.compile's
        "reduce-overhead" mode). The first calls are slow while it compiles; results equal
        the eager path's. Other options go to torch.compile."""
        if cuda_graphs is None:
            cuda_graphs = self.model.output.weight.device.type == "cuda"
        if cuda_graphs:
            compile_options.setdefault("mode", "reduce-overhead")
        compile_options.setdefault("dynamic", False)  # one static graph per shape
        # Traced without inference mode: torch 2.13's inductor fails on views of input tensors
        # traced inside it. The step runs under no_grad instead (_run_compiled_step), on
        # ordinary (non-inference) tensors: hence the clones there and in _generate.
        step = functools.partial(type(self.model).forward.__wrapped__, self.model)
        self._compiled_step = torch.compile(step, **compile_options)

    def _run_compiled_step(self, tokens, position, cache, pads):
        with torch.inference_mode(False), torch.no_grad():
            return self._compiled_step(tokens.clone(), position, cache, pads,
                                       last_logits_only=True)

    # ------------------------------------------------------------------ reference API
    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Generate from token ids. Returns (tokens, logprobs) per prompt, as the reference:
        tokens exclude the prompt unless `echo`, stop before EOS, and number at most
        max_gen_len; logprobs (if asked) are each token's log-probability."""
        rows = _drain(self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs,
                                     echo))
        return ([row.tokens for row in rows],
                [row.logprobs for row in rows] if logprobs else None)

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        stop: Optional[Sequence[str]] = None,
    ) -> List[CompletionPrediction]:
        """Complete each prompt. Returns [{"generation": str, "finish_reason": ...}] (plus
        "tokens" and "logprobs" with logprobs=True). Batches larger than max_batch_size run
        in chunks. Generation ends at EOS, at `max_gen_len` tokens (default max_seq_len - 1),
        or before the first of the `stop` strings."""
        if not isinstance(prompts, (list, tuple)):
            raise TypeError("text_completion expects a list of prompt strings")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {index} must be a str, got {type(prompt).__name__}")
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        rows = self._generate_in_chunks(prompt_tokens, max_gen_len, temperature, top_p,
                                        logprobs, echo, stop)
        return [self._prediction(row, logprobs, lambda text: text) for row in rows]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        stop: Optional[Sequence[str]] = None,
    ) -> List[ChatPrediction]:
        """Answer each dialog as the assistant, in the Llama 2 chat format. Returns
        [{"generation": {"role": "assistant", "content": str}, "finish_reason": ...}] (plus
        "tokens" and "logprobs" with logprobs=True). A dialog that contains the format's
        special tags is not run; its answer is the reference's error text."""
        if not isinstance(dialogs, (list, tuple)):
            raise TypeError("chat_completion expects a list of dialogs")
        for index, dialog in enumerate(dialogs):
            validate_dialog(dialog, index)
        unsafe = [has_special_tags(dialog) for dialog in dialogs]
        all_tokens = [dialog_to_tokens(dialog, self.tokenizer.encode, index)
                      for index, dialog in enumerate(dialogs)]
        safe_tokens = [t for t, bad in zip(all_tokens, unsafe) if not bad]
        # The refused dialogs are not run, but sampling draws random numbers as if they were
        # in the batch, as in the reference, so seeded samples of the others stay the same.
        noise_batch = ([len(t) for t in all_tokens], [i for i, bad in enumerate(unsafe) if not bad])
        safe_rows = iter(self._generate_in_chunks(safe_tokens, max_gen_len, temperature,
                                                  top_p, logprobs, False, stop, noise_batch))
        results: List[ChatPrediction] = []
        for is_unsafe in unsafe:
            if is_unsafe:
                row = _Row(prompt=[], limit=0, text=UNSAFE_ERROR, finish_reason="stop")
                results.append(self._prediction(row, logprobs, _as_assistant))
            else:
                results.append(self._prediction(next(safe_rows), logprobs, _as_assistant))
        return results

    # ------------------------------------------------------------------ streaming
    def stream_text(self, prompt: str, temperature: float = 0.6, top_p: float = 0.9,
                    max_gen_len: Optional[int] = None,
                    stop: Optional[Sequence[str]] = None) -> "TextStream":
        """Complete one prompt, yielding text pieces as tokens arrive. Joined, the pieces equal
        text_completion's "generation" for the same arguments and seed. After iteration the
        stream's `text` and `finish_reason` are set. Every rank must iterate; pieces are
        yielded on rank 0 only."""
        if not isinstance(prompt, str):
            raise TypeError(f"stream_text expects a str prompt, got {type(prompt).__name__}")
        tokens = self.tokenizer.encode(prompt, bos=True, eos=False)
        return TextStream(self, tokens, max_gen_len, temperature, top_p, stop)

    def stream_chat(self, dialog: Dialog, temperature: float = 0.6, top_p: float = 0.9,
                    max_gen_len: Optional[int] = None,
                    stop: Optional[Sequence[str]] = None) -> "TextStream":
        """Answer one dialog, yielding the assistant's text as it is generated (see
        stream_text). A dialog with special tags yields the reference's error text."""
        validate_dialog(dialog, 0)
        if has_special_tags(dialog):
            return TextStream(self, None, max_gen_len, temperature, top_p, stop)
        tokens = dialog_to_tokens(dialog, self.tokenizer.encode)
        return TextStream(self, tokens, max_gen_len, temperature, top_p, stop)

    def free_cache(self) -> None:
        """Release the KV cache kept between calls."""
        self._cache = None

    # ------------------------------------------------------------------ the decode loop
    def _generate_in_chunks(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs,
                            echo, stop, noise_batch=None) -> List[_Row]:
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        size = self.model.params.max_batch_size
        if len(prompt_tokens) > size:
            noise_batch = None  # the reference cannot run such a batch: nothing to follow
        rows: List[_Row] = []
        for begin in range(0, len(prompt_tokens), size):
            rows += _drain(self._generate(prompt_tokens[begin: begin + size], max_gen_len,
                                          temperature, top_p, logprobs, echo, stop,
                                          index_offset=begin, noise_batch=noise_batch))
        return rows

    @torch.inference_mode()
    def _generate(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo,
                  stop=None, stream=False, index_offset=0, noise_batch=None) -> Iterator[str]:
        """Yields text pieces of row 0 when `stream`; returns the finished rows.
        `noise_batch` = (prompt lengths of a larger batch, the rows of it these prompts are):
        sampling then draws its random numbers for that batch (see _ReferenceNoise)."""
        params = self.model.params
        stop = _check_arguments(prompt_tokens, max_gen_len, temperature, top_p, stop, params,
                                self.tokenizer.n_words, index_offset)
        track_text = stream or bool(stop)
        bsz = len(prompt_tokens)
        if bsz == 0:
            return []
        device = self.model.output.weight.device
        lens = [len(t) for t in prompt_tokens]
        max_len, min_len = max(lens), min(lens)
        total_len = min(params.max_seq_len, max_gen_len + max_len)
        rows = [_Row(prompt=list(t), limit=min(max_gen_len, total_len - len(t)),
                     text="" if track_text else None) for t in prompt_tokens]
        n_steps = max(row.limit for row in rows)

        # Prefill: all prompts in one pass, left-padded to the longest.
        # a compiled step takes the cache whole: a slice of its rows would be copied each step
        cache = self._cache_for(bsz, max_len + n_steps,
                                exact_rows=self._compiled_step is not None and n_steps > 1)
        pads = None if max_len == min_len else torch.tensor([max_len - n for n in lens],
                                                            device=device)
        tokens = torch.zeros((bsz, max_len), dtype=torch.long, device=device)
        for i, t in enumerate(prompt_tokens):
            tokens[i, max_len - len(t):] = torch.tensor(t, dtype=torch.long, device=device)
        want_prompt_logprobs = logprobs and echo
        logits = self.model.forward(tokens, 0, cache, pads,
                                    last_logits_only=not want_prompt_logprobs)
        if want_prompt_logprobs:
            _set_prompt_logprobs(rows, logits, tokens, unshifted=min_len == total_len)
        last_logits = logits[:, -1]  # (bsz, vocab): every row's prompt ends at the last slot

        # Decode: one token per row per step.
        generated = torch.empty((bsz, n_steps), dtype=torch.long, device=device)
        token_logprobs = torch.zeros((bsz, n_steps), device=device) if logprobs else None
        limits = torch.tensor([row.limit for row in rows], device=device)
        done = limits == 0
        noise = None
        if temperature > 0:
            noise_lens, noise_rows = noise_batch or (lens, list(range(bsz)))
            noise = _ReferenceNoise(noise_lens, noise_rows, last_logits.shape[-1], device)
        if self._compiled_step is not None:
            with torch.inference_mode(False):  # ordinary tensors (see compile_decode)
                position = torch.tensor([max_len], device=device)  # advanced on the device
                pads = pads.clone() if pads is not None else None
            # The cache is written in place by a captured graph: its address must not change.
            cache.mark_static()
        steps_run = 0
        for step in range(n_steps):
            next_token = _sample(last_logits, temperature, top_p,
                                 noise.for_step(step) if noise else None)  # (bsz,)
            generated[:, step] = next_token
            if logprobs:
                token_logprobs[:, step] = torch.log_softmax(last_logits, dim=-1).gather(
                    1, next_token[:, None])[:, 0]
            steps_run = step + 1
            done |= (next_token == self.tokenizer.eos_id) | (limits <= steps_run)
            if track_text:  # needs this step's tokens on the host
                for i, token in enumerate(next_token.tolist()):
                    if self._track_row(rows[i], token, stop):
                        done[i] = True
                if stream:
                    piece = _stream_piece(rows[0], stop)
                    if piece:
                        yield piece
            if bool(done.all()):  # the one host sync of a step
                break
            if self._compiled_step is None:
                logits = self.model.forward(next_token[:, None], max_len + step, cache, pads,
                                            last_logits_only=True)
            else:
                logits = self._run_compiled_step(next_token[:, None], position, cache, pads)
                position += 1
            last_logits = logits[:, -1]

        _finish_rows(rows, generated[:, :steps_run].tolist(),
                     token_logprobs[:, :steps_run].tolist() if logprobs else None,
                     echo, self.tokenizer)
        if stream:
            rest = rows[0].text[rows[0].emitted:]
            if rest:
                yield rest
        return rows

    def _track_row(self, row: _Row, token: int, stop: List[str]) -> bool:
        """Add a token to a row's running text; True when a stop string has just ended it."""
        if row.finish_reason == "stop" or len(row.tokens) >= row.limit:
            return False  # finished earlier; later tokens of this row are discarded
        row.tokens.append(token)
        if token == self.tokenizer.eos_id:
            row.tokens.pop()
            row.finish_reason = "stop"
            return False
        unchanged = min(len(row.text), len(row.settled_text))  # text before this is final
        _extend_text(row, self.tokenizer)
        for s in stop:  # a match not there before must reach into the text that changed
            at = row.text.find(s, max(0, unchanged - len(s) + 1))
            if at != -1:
                row.text = row.text[:at]
                row.stopped_by = s
                row.finish_reason = "stop"
                return True
        return False

    def _cache_for(self, bsz: int, length: int, exact_rows: bool = False) -> KVCache:
        """A KV cache of at least bsz rows (exactly bsz with exact_rows) and `length` slots,
        reused across calls and grown only when a call needs more."""
        cache = self._cache
        if exact_rows and cache is not None and cache.rows != bsz:
            cache = self._cache = None
        if cache is None or cache.rows < bsz or cache.length < length:
            if cache is not None:
                bsz, length = max(bsz, cache.rows), max(length, cache.length)
            self._cache = None  # release the old one before allocating
            self._cache = self.model.new_cache(bsz, length)
        return self._cache

    def _prediction(self, row: _Row, logprobs: bool, wrap):
        text = row.text if row.text is not None else self.tokenizer.decode(row.tokens)
        prediction = {"generation": wrap(text)}
        if logprobs:
            prediction["tokens"] = [self.tokenizer.decode(x) for x in row.tokens]
            prediction["logprobs"] = row.logprobs
        prediction["finish_reason"] = row.finish_reason
        return prediction


class TextStream:
    """Iterate for text pieces; afterwards `text`, `tokens` and `finish_reason` are set."""

    def __init__(self, llama: Llama, prompt_tokens, max_gen_len, temperature, top_p, stop):
        self._llama, self._prompt_tokens = llama, prompt_tokens
        if max_gen_len is None:
            max_gen_len = llama.model.params.max_seq_len - 1
        self._args = (max_gen_len, temperature, top_p, stop)
        self.text: Optional[str] = None
        self.tokens: Optional[List[int]] = None
        self.finish_reason: Optional[FinishReason] = None

    def __iter__(self) -> Iterator[str]:
        if self._prompt_tokens is None:  # refused dialog
            self.text, self.tokens, self.finish_reason = UNSAFE_ERROR, [], "stop"
            if is_main_process():
                yield UNSAFE_ERROR
            return
        max_gen_len, temperature, top_p, stop = self._args
        rows = yield from _only_on_main(self._llama._generate(
            [self._prompt_tokens], max_gen_len, temperature, top_p, False, False, stop,
            stream=True))
        self.text, self.tokens, self.finish_reason = rows[0].text, rows[0].tokens, \
            rows[0].finish_reason


def _only_on_main(pieces):
    """Run a piece generator to its end on every rank; yield its pieces on rank 0 only."""
    main = is_main_process()
    while True:
        try:
            piece = next(pieces)
        except StopIteration as finished:
            return finished.value
        if main:
            yield piece


def _drain(generator):
    while True:
        try:
            next(generator)
        except StopIteration as finished:
            return finished.value


def _as_assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


def _check_arguments(prompt_tokens, max_gen_len, temperature, top_p, stop, params, n_words,
                     index_offset) -> List[str]:
    """Raises ArgumentError (see llama.validation) for the first bad argument; returns the stop
    strings as a list."""
    check_int("max_gen_len", max_gen_len, 0)
    check_temperature(temperature)
    check_top_p(top_p)
    stop = check_stop(stop)
    if not isinstance(prompt_tokens, (list, tuple)):
        raise ArgumentTypeError("prompt_tokens",
                                "prompt_tokens must be a list of lists of token ids")
    if len(prompt_tokens) > params.max_batch_size:
        raise ArgumentValueError(
            "prompt_tokens", f"{len(prompt_tokens)} prompts exceed max_batch_size="
                             f"{params.max_batch_size}: pass fewer prompts per call, or build "
                             f"with a larger max_batch_size")
    for index, tokens in enumerate(prompt_tokens):
        where = f"prompt {index + index_offset}"
        if not isinstance(tokens, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ArgumentTypeError("prompt_tokens", f"{where} must be a list of int token ids")
        if len(tokens) == 0:
            raise ArgumentValueError("prompt_tokens", f"{where} is empty: it needs at least "
                                                      f"one token (e.g. BOS)")
        if len(tokens) > params.max_seq_len:
            raise ArgumentValueError(
                "prompt_tokens", f"{where} has {len(tokens)} tokens, more than max_seq_len="
                                 f"{params.max_seq_len}: shorten it, or build with a larger "
                                 f"max_seq_len")
        bad = [t for t in tokens if not 0 <= t < n_words]
        if bad:
            raise ArgumentValueError(
                "prompt_tokens", f"{where} has token ids outside the vocabulary [0, {n_words}): "
                                 f"{bad[:5]}")
    return stop


def sample_top_p(probs: torch.Tensor, p: float,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose probability mass reaches p.
    probs: (bsz, vocab). Returns (bsz, 1) token ids. `noise` (bsz, vocab) of Exp(1) draws
    replaces torch.multinomial's own: multinomial picks argmax(probs / noise) with noise it
    draws itself, so passing the same draws gives the same tokens."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p  # tokens outside the nucleus: the mass before them is p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    if noise is None:
        next_token = torch.multinomial(probs_sort, num_samples=1)
    else:
        next_token = torch.argmax(probs_sort / noise, dim=-1, keepdim=True)
    return torch.gather(probs_idx, -1, next_token)


class _ReferenceNoise:
    """The random numbers the reference's loop would use, handed to each row in its order.

    The reference samples a token for every row at every position from the end of the
    shortest prompt on, discarding those drawn inside longer prompts: its k-th token of row i
    uses the draw of step (len_i - min_len + k). Prefilling all prompts at once, we draw the
    same sequence and give each row its own draw, so that seeded samples equal the
    reference's for batches of mixed lengths too."""

    def __init__(self, prompt_lens: List[int], rows: List[int], vocab_size: int, device):
        """prompt_lens: the reference's whole batch; rows: which of its rows we generate."""
        shortest = min(prompt_lens)
        self.offsets = [prompt_lens[row] - shortest for row in rows]
        self.rows = rows
        self.plain = not any(self.offsets) and rows == list(range(len(prompt_lens)))
        self.shape, self.device = (len(prompt_lens), vocab_size), device
        self.draws: Dict[int, torch.Tensor] = {}
        self.drawn = 0

    def for_step(self, step: int) -> torch.Tensor:
        while self.drawn <= step + max(self.offsets):
            noise = torch.empty(self.shape, device=self.device).exponential_(1)
            self.draws[self.drawn] = noise
            self.drawn += 1
        for old in [d for d in self.draws if d < step]:
            del self.draws[old]
        if self.plain:
            return self.draws[step]
        return torch.stack([self.draws[step + offset][row]
                            for row, offset in zip(self.rows, self.offsets)])


def _sample(logits: torch.Tensor, temperature: float, top_p: float,
            noise: Optional[torch.Tensor]) -> torch.Tensor:
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return sample_top_p(probs, top_p, noise).reshape(-1)
    return torch.argmax(logits, dim=-1)


def _set_prompt_logprobs(rows: List[_Row], logits: torch.Tensor, tokens: torch.Tensor,
                         unshifted: bool) -> None:
    """Each prompt token's log-probability given the tokens before it (0 for the first), for
    echo. logits: (bsz, max_len, vocab) over the left-padded prompts in `tokens`."""
    logp = torch.log_softmax(logits, dim=-1)
    if unshifted:
        # The reference, when no token is generated at all (every prompt fills the run),
        # scores each prompt token against the logits of its own position; kept as it is so
        # results match it.
        scores = logp.gather(2, tokens[:, :, None])[:, :, 0]
    else:
        scores = torch.zeros(tokens.shape, device=logits.device)
        scores[:, 1:] = logp[:, :-1].gather(2, tokens[:, 1:, None])[:, :, 0]
    max_len = tokens.shape[1]
    for row, row_scores in zip(rows, scores.tolist()):
        pad = max_len - len(row.prompt)
        row.logprobs = row_scores[pad:]
        if not unshifted:
            row.logprobs[0] = 0.0


def _finish_rows(rows: List[_Row], generated: List[List[int]],
                 logprobs: Optional[List[List[float]]], echo: bool, tokenizer) -> None:
    """Cut each row to its limit and first EOS, as the reference does; mark finish reasons."""
    eos = tokenizer.eos_id
    for i, row in enumerate(rows):
        tokens = generated[i][: row.limit]
        probs = logprobs[i][: row.limit] if logprobs is not None else []
        if row.stopped_by is not None:
            tokens, probs = _tokens_before_stop(tokens, probs, row.text, tokenizer)
        prompt_probs = row.logprobs
        if echo:
            tokens = row.prompt + tokens
            probs = prompt_probs + probs if logprobs is not None else []
        if eos in tokens:
            cut = tokens.index(eos)
            tokens, probs = tokens[:cut], probs[:cut]
            row.finish_reason = "stop"
        elif row.stopped_by is not None:
            row.finish_reason = "stop"
        row.tokens, row.logprobs = tokens, probs
        if row.text is not None and row.stopped_by is None:
            row.text = tokenizer.decode(tokens)


def _extend_text(row: _Row, tokenizer, settle_every: int = 8) -> None:
    """Update row.text to tokenizer.decode(row.tokens) after tokens were appended, decoding
    only the tokens since the last settled point, plus the one before it: constant work per
    token instead of decoding everything again. That one token of context makes the rest
    decode as it does mid-text (SentencePiece drops the whitespace a text starts with), so
    the point only settles where that token decodes to something, and where the text does
    not end in half a multi-byte character that later byte tokens may still complete."""
    context = max(row.settled - 1, 0)
    head = tokenizer.decode(row.tokens[context: row.settled])
    window = tokenizer.decode(row.tokens[context:])
    row.text = row.settled_text + window[len(head):]
    if (len(row.tokens) - row.settled >= settle_every and not row.text.endswith("\ufffd")
            and tokenizer.decode(row.tokens[-1:])):
        row.settled, row.settled_text = len(row.tokens), row.text


def _tokens_before_stop(tokens, probs, text, tokenizer):
    """The longest run of tokens whose text fits before a stop string."""
    prefix = _Row(prompt=[], limit=len(tokens), text="")
    for token in tokens:
        prefix.tokens.append(token)
        _extend_text(prefix, tokenizer)
        if len(prefix.text) > len(text):
            prefix.tokens.pop()
            break
    return prefix.tokens, probs[: len(prefix.tokens)]


def _stream_piece(row: _Row, stop: List[str]) -> str:
    """The part of a row's text that is safe to emit now: it will not change as tokens arrive
    (no trailing half of a multi-byte character) and cannot be the start of a stop string."""
    text = row.text
    if row.stopped_by is not None:
        safe = len(text)  # already cut before the stop string
    else:
        end = len(text.rstrip("\ufffd"))
        held = max((k for s in stop for k in range(1, min(len(s) - 1, end) + 1)
                    if text[end - k: end] == s[:k]), default=0)
        safe = end - held
    if safe <= row.emitted:
        return ""
    piece = text[row.emitted: safe]
    row.emitted = safe
    return piece
