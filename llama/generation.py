"""Llama: build a model from Meta's files, then complete text and chats (as lists or streams).

Every API runs on the decode engine (engine.py), which the server drives too: a call's prompts
are prefilled in one left-padded pass, then each step samples one token per row and feeds it
back, syncing with the host once.
"""

import os
import sys
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypedDict

import torch

from llama.chat_format import (
    B_INST,
    B_SYS,
    E_INST,
    E_SYS,
    SPECIAL_TAGS,
    UNSAFE_ERROR,
    Dialog,
    Message,
    Role,
)
from llama.chat_formats import dialog_tokens, has_special_tags
from llama.constrained.calling import library_answer, library_prompts, uses_tools
from llama.constrained.spec import (
    check_no_stop,
    grammar_spec,
    make_constraint,
    response_format_spec,
)
from llama.engine.compiled import CompiledDecode
from llama.engine.core import Engine, EngineSequence
from llama.engine.distributed import broadcast_object, is_main_process
from llama.engine.results import FinishReason, Result, finish, prompt_logprobs
from llama.engine.sampling import ReferenceNoise, sample_top_p
from llama.engine.stream import TextStream, drain
from llama.engine.text import TextTracker
from llama.engine.validation import (
    ArgumentError,
    ArgumentTypeError,
    check_dialog,
    check_generation_arguments,
    check_text,
)
from llama.loading import (
    LoadOptions,
    check_build_arguments,
    check_options,
    load_model,
)
from llama.model import KVCache, Transformer
from llama.session import ChatSession
from llama.tokenizer import Tokenizer  # noqa: F401  (importable from here, as in the reference)
from llama.tokenizers import AnyTokenizer, load_tokenizer, stop_tokens

# The reference's module-level names are importable from here, as they were from its
# llama/generation.py.
__all__ = ["Llama", "TextStream", "CompletionPrediction", "ChatPrediction", "FinishReason",
           "Role", "Message", "Dialog", "B_INST", "E_INST", "B_SYS", "E_SYS", "SPECIAL_TAGS",
           "UNSAFE_ERROR", "sample_top_p"]


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


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: Optional[str] = None,
        max_seq_len: Optional[int] = None,
        max_batch_size: Optional[int] = None,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Optional[str] = None,
        dtype=None,
        verify: bool = False,
        verbose: bool = True,
        quiet_other_ranks: bool = True,
        quantize: Optional[str] = None,
        group_size: Optional[int] = None,
        reserve_memory: int = 0,
        kv_cache_dtype=None,
        activations: Optional[str] = None,
    ) -> "Llama":
        """Load a checkpoint directory (params.json + consolidated.NN.pth, or Hugging Face's
        config.json + *.safetensors) and a tokenizer (by default the directory's
        tokenizer.model). max_seq_len and max_batch_size must be given.

        Runs as a plain process or under torchrun; the checkpoint's shard count need not equal
        the number of processes (shards are split or merged while loading). `device` defaults
        to CUDA when available, else the CPU; `dtype` to bfloat16/float16 on GPUs; on the CPU
        the checkpoint's bfloat16 matrices are kept as they are and computed with in float32
        (llama/layers/bf16.py: float32's function at half its memory; dtype=torch.float32 for
        float32 weights). `verify=True` checks every file against checklist.chk first.
        `seed` must be the same on every rank: all ranks sample the same tokens. Every
        argument, the checkpoint directory and then the tokenizer file are checked before
        anything is loaded, and then whether the model fits in the memory this process may use
        less `reserve_memory` bytes the caller will need beside it (a server's prefix cache)
        (llama/checkpoints/memory_fit.py: NotEnoughMemoryError names the settings that would fit).

        As the reference's build does, on every process but rank 0 this sends `sys.stdout` to
        os.devnull, so that a script run under torchrun prints its results once;
        `quiet_other_ranks=False` leaves stdout alone (for programs that manage their output).

        `quantize="int8"` (one scale per output row) or `"int4"` (groups of `group_size`
        input columns, 32 by default) stores the projections and the output matrix in that
        many bits per weight, quantized tensor by tensor while loading: less memory, faster
        decoding where reading weights is the cost, outputs close to but not equal to the
        float model's (README, "Quantized weights").

        `kv_cache_dtype="bfloat16"` keeps the KV cache's keys and values in bfloat16 under a
        CPU model's float32 activations: half the cache's memory, and decode steps that read
        half the bytes, at the cost of rounding each key and value once as it is written
        (every query attends to the rounded values, in float32). None (the default) keeps
        them in the activations' dtype, as the reference does (docs/MEMORY_AND_BF16.md).

        `activations="int8"` (CPU, int8 or int4 weights) rounds the activations to int8 in
        blocks of 32, as llama.cpp's q8_0 does: 1.25-1.6x faster prefills on AVX-512 VNNI
        CPUs, a coarser rounding than the default's (docs/QUANTIZATION.md).
        """
        tokenizer_path = check_build_arguments(ckpt_dir, tokenizer_path, max_seq_len,
                                               max_batch_size, model_parallel_size, seed,
                                               device, dtype, verify, verbose)
        options = check_options(LoadOptions(model_parallel_size, seed, device, dtype, verify,
                                            verbose, quantize, group_size, reserve_memory,
                                            kv_cache_dtype, activations))
        try:
            tokenizer = load_tokenizer(tokenizer_path)
        except ArgumentError as error:  # named as this caller knows it
            message = "tokenizer_path" + str(error)[len(error.param):]
            raise type(error)("tokenizer_path", message) from None
        model = load_model(ckpt_dir, tokenizer.n_words, max_seq_len, max_batch_size, options)
        if quiet_other_ranks and not is_main_process():
            sys.stdout = open(os.devnull, "w")
        return Llama(model, tokenizer)

    def __init__(self, model: Transformer, tokenizer: AnyTokenizer):
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
        the eager path's. On the CPU, its first steps for each shape are timed against eager
        ones and the faster kind is kept (llama/engine/compiled.py). Other options go to
        torch.compile."""
        self._compiled_step = CompiledDecode(self.model, cuda_graphs, **compile_options)

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
        tokens exclude the prompt unless `echo`, stop before a stop token (EOS; for Llama 3
        also <|eot_id|> and <|eom_id|>), and number at most max_gen_len; logprobs (if asked)
        are each token's log-probability."""
        rows = drain(self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs,
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
        response_format=None,
        regex: Optional[str] = None,
        grammar: Optional[str] = None,
    ) -> List[CompletionPrediction]:
        """Complete each prompt. Returns [{"generation": str, "finish_reason": ...}] (plus
        "tokens" and "logprobs" with logprobs=True). Batches larger than max_batch_size run
        in chunks. Generation ends at a stop token (EOS; for Llama 3 also end of turn or
        message), at `max_gen_len` tokens (default max_seq_len - 1), or before the first of
        the `stop` strings.

        At most one of: `response_format` ({"type": "json_object"}, {"type": "json_schema",
        "json_schema": {"schema": {...}}} or a pydantic model class), `regex`, `grammar` (a
        Lark grammar) constrains every generation to match it, completed within
        max_gen_len (docs/STRUCTURED_OUTPUT.md)."""
        if not isinstance(prompts, (list, tuple)):
            raise ArgumentTypeError("prompts", "prompts must be a list of prompt strings, got "
                                               f"{type(prompts).__name__}")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ArgumentTypeError("prompts", f"prompt {index + 1} must be a str, got "
                                                   f"{type(prompt).__name__}")
            check_text(f"prompt {index + 1}", prompt, "prompts")
        spec = grammar_spec(response_format, regex, grammar)
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        rows = self._generate_in_chunks(prompt_tokens, max_gen_len, temperature, top_p,
                                        logprobs, echo, stop, spec=spec, after_prompt=True)
        return [self._prediction(row, logprobs, lambda text: text) for row in rows]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        stop: Optional[Sequence[str]] = None,
        response_format=None,
        tools=None,
        tool_choice=None,
    ) -> List[ChatPrediction]:
        """Answer each dialog as the assistant, in the chat format of the tokenizer's family
        (Llama 2's [INST] format, or Llama 3's headers ended by <|eot_id|>). Returns
        [{"generation": {"role": "assistant", "content": str}, "finish_reason": ...}] (plus
        "tokens" and "logprobs" with logprobs=True). A dialog that contains the format's
        special tags is not run; its answer is the reference's error text. `response_format`
        constrains the answers as in text_completion (the model is not told the schema: say
        it in the dialog).

        `tools` and `tool_choice`, as OpenAI's, offer functions in the family's tool format
        (Llama 3.1's own; a JSON convention for Llama 2: docs/STRUCTURED_OUTPUT.md). A call
        comes back as {"role": "assistant", "content": "", "tool_calls": [OpenAI's calls,
        arguments valid against the function's parameters]}, finish_reason "tool_calls";
        dialogs may hold such messages and {"role": "tool", "content": ...} results."""
        if not isinstance(dialogs, (list, tuple)):
            raise ArgumentTypeError("dialogs", "dialogs must be a list of dialogs, got "
                                               f"{type(dialogs).__name__}")
        spec = response_format_spec(response_format)
        offered = None
        if tools is not None or tool_choice is not None or any(map(uses_tools, dialogs)):
            dialogs, all_tokens, offered, spec = library_prompts(self.tokenizer, dialogs, tools,
                                                                 tool_choice, spec)
        else:
            for index, dialog in enumerate(dialogs):
                check_dialog(dialog, index)
            all_tokens = [dialog_tokens(self.tokenizer, dialog, index)
                          for index, dialog in enumerate(dialogs)]
        unsafe = [has_special_tags(self.tokenizer, dialog) for dialog in dialogs]
        safe_tokens = [t for t, bad in zip(all_tokens, unsafe) if not bad]
        names = [f"dialog {i + 1}" for i, bad in enumerate(unsafe) if not bad]
        # The refused dialogs are not run, but sampling draws random numbers as if they were
        # in the batch, as in the reference, so seeded samples of the others stay the same.
        noise_batch = ([len(t) for t in all_tokens], [i for i, bad in enumerate(unsafe) if not bad])
        safe_rows = iter(self._generate_in_chunks(safe_tokens, max_gen_len, temperature,
                                                  top_p, logprobs, False, stop, noise_batch,
                                                  spec, names=names))
        results: List[ChatPrediction] = []
        for is_unsafe in unsafe:
            if is_unsafe:
                refused = Result(tokens=[], logprobs=[], text=UNSAFE_ERROR, finish_reason="stop")
                results.append(self._prediction(refused, logprobs, _as_assistant))
            else:
                answer = self._prediction(next(safe_rows), logprobs, _as_assistant)
                results.append(library_answer(self.tokenizer, answer, offered))
        return results

    # ------------------------------------------------------------------ streaming
    def stream_text(self, prompt: str, temperature: float = 0.6, top_p: float = 0.9,
                    max_gen_len: Optional[int] = None, stop: Optional[Sequence[str]] = None,
                    cancel: Optional[Callable[[], bool]] = None, response_format=None,
                    regex: Optional[str] = None, grammar: Optional[str] = None
                    ) -> "TextStream":
        """Complete one prompt, yielding text pieces as tokens arrive (constrained by
        response_format, regex or grammar as in text_completion). Joined, the pieces equal
        text_completion's "generation" for the same arguments and the same random state
        (seed and earlier calls). After iteration the stream's `text` and `finish_reason` are
        set. Every rank must iterate; pieces are yielded on rank 0 only. `cancel()`, asked on
        rank 0 after each token, ends the generation on every rank when it returns True
        (finish_reason "cancelled"; e.g. a key pressed)."""
        if not isinstance(prompt, str):
            raise ArgumentTypeError("prompt", f"prompt must be a str, got "
                                              f"{type(prompt).__name__}")
        check_text("prompt", prompt)
        spec = grammar_spec(response_format, regex, grammar)
        tokens = self.tokenizer.encode(prompt, bos=True, eos=False)
        return TextStream(self, tokens, max_gen_len, temperature, top_p, stop, cancel, spec,
                          after_prompt=True)

    def stream_chat(self, dialog: Dialog, temperature: float = 0.6, top_p: float = 0.9,
                    max_gen_len: Optional[int] = None, stop: Optional[Sequence[str]] = None,
                    cancel: Optional[Callable[[], bool]] = None, response_format=None
                    ) -> "TextStream":
        """Answer one dialog, yielding the assistant's text as it is generated (see
        stream_text; response_format as in chat_completion). A dialog with special tags
        yields the reference's error text."""
        check_dialog(dialog, 0)
        spec = response_format_spec(response_format)
        if has_special_tags(self.tokenizer, dialog):
            return TextStream(self, None, max_gen_len, temperature, top_p, stop)
        return TextStream(self, dialog_tokens(self.tokenizer, dialog), max_gen_len, temperature,
                          top_p, stop, cancel, spec, name="dialog")

    def chat_session(self, system: Optional[str] = None, reply_room: Optional[int] = None,
                     retokenize: bool = False) -> ChatSession:
        """A conversation that keeps its keys and values between turns: each
        `session.send(content, temperature=..., top_p=..., max_gen_len=..., stop=...)` returns
        the answer (`session.stream(...)` yields it in pieces, as stream_chat) and prefills
        only the new turn, not the whole conversation again; `session.messages` is the
        dialog so far. The model's answers stay as it generated them (its tokens, then EOS):
        at temperature 0 an answer is the one the conversation's tokens give without a cache.
        `retokenize=True` encodes the answers' text again, as chat_completion does: answers
        are then chat_completion's for `session.messages` plus the new message, at the cost
        of prefilling again an answer whose tokens the tokenizer would not have chosen. When
        fewer than `reply_room` tokens (default max_seq_len // 4, at least 16) would be left
        for an answer, the oldest exchanges are dropped, the system prompt kept. The session
        holds a KV cache row of max_seq_len slots of its own (session.free_cache())."""
        return ChatSession(self, system, reply_room, retokenize)

    def free_cache(self) -> None:
        """Release the KV caches kept between calls (generation's, and the one the model
        keeps for forward(tokens, start_pos))."""
        self._cache = None
        self.model.free_cache()

    # ------------------------------------------------------------------ the decode loop
    def _generate_in_chunks(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs,
                            echo, stop, noise_batch=None, spec=None, after_prompt=False,
                            names=None) -> List[Result]:
        names = names or [f"prompt {i + 1}" for i in range(len(prompt_tokens))]
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        size = self.model.params.max_batch_size
        if len(prompt_tokens) > size:
            noise_batch = None  # the reference cannot run such a batch: nothing to follow
        rows: List[Result] = []
        for begin in range(0, len(prompt_tokens), size):
            rows += drain(self._generate(prompt_tokens[begin: begin + size], max_gen_len,
                                          temperature, top_p, logprobs, echo, stop,
                                          names=names[begin: begin + size],
                                          noise_batch=noise_batch, spec=spec,
                                          after_prompt=after_prompt))
        return rows

    @torch.inference_mode()
    def _generate(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo,
                  stop=None, stream=False, names=None, noise_batch=None,
                  cancel=None, spec=None, after_prompt=False) -> Iterator[str]:
        """Yields text pieces of row 0 when `stream`; returns a Result per prompt.
        `noise_batch` = (prompt lengths of a larger batch, the rows of it these prompts are):
        sampling then draws its random numbers for that batch (see ReferenceNoise).
        `cancel()` is asked after each step; rank 0's answer holds for every rank. `spec`: a
        grammar.GrammarSpec every row's generation must match; `after_prompt` (completions):
        its text is what the grammar matched, decoded as it follows the prompt
        (SentencePiece's "▁yes" keeps the space that decoding alone drops); `names`: what
        errors call the prompts."""
        params = self.model.params
        stop = check_generation_arguments(prompt_tokens, max_gen_len, temperature, top_p, stop,
                                          params, self.tokenizer.n_words, names)
        bsz = len(prompt_tokens)
        if bsz == 0:
            return []
        lens = [len(t) for t in prompt_tokens]
        max_len, min_len = max(lens), min(lens)
        total_len = min(params.max_seq_len, max_gen_len + max_len)
        after = spec is not None and after_prompt
        rows = [EngineSequence(prompt=list(t), limit=min(max_gen_len, total_len - len(t)),
                               temperature=temperature, top_p=top_p, logprobs=logprobs,
                               text=TextTracker(self.tokenizer, stop, t[-1:] if after else ())
                               if stream or stop or after else None)
                for t in prompt_tokens]
        if spec is not None:
            check_no_stop(spec, stop)
            for row in rows:
                row.constraint = make_constraint(self.tokenizer, params.vocab_size, spec,
                                                 row.limit)
        n_steps = max(row.limit for row in rows)
        # a compiled step takes the cache whole: a slice of its rows would be copied each step
        compiled = self._compiled_step is not None and n_steps > 1
        cache = self._cache_for(bsz, max_len + n_steps, exact_rows=compiled)
        stop_ids = stop_tokens(self.tokenizer)
        engine = Engine(self.model, stop_ids, cache, self._compiled_step if compiled else None)
        noise = None
        if temperature > 0:
            noise_lens, noise_rows = noise_batch or (lens, list(range(bsz)))
            noise = ReferenceNoise(noise_lens, noise_rows, self.model.params.vocab_size,
                                   engine.device)

        # Prefill: all prompts in one pass, left-padded to the longest.
        want_prompt_logprobs = logprobs and echo
        logits = engine.add_batch(rows, noise, all_logits=want_prompt_logprobs)
        scored = (prompt_logprobs(rows, logits, unshifted=min_len == total_len)
                  if want_prompt_logprobs else None)
        # Decode: every row steps until all are done, as in the reference.
        while not all(row.finished for row in rows):
            engine.step()
            piece = rows[0].text.piece() if stream else ""
            if piece:
                yield piece
            if cancel is not None and broadcast_object(bool(cancel())):  # one more collective
                for row in rows:
                    row.finish_reason = row.finish_reason or "cancelled"
        results = [finish(row, echo, scored[i] if scored else None, stop_ids)
                   for i, row in enumerate(rows)]
        if stream:
            rest = rows[0].text.rest()
            if rest:
                yield rest
        return results

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

    def _prediction(self, result: Result, logprobs: bool, wrap):
        text = result.text if result.text is not None else self.tokenizer.decode(result.tokens)
        prediction = {"generation": wrap(text)}
        if logprobs:
            prediction["tokens"] = [self.tokenizer.decode(x) for x in result.tokens]
            prediction["logprobs"] = result.logprobs
        prediction["finish_reason"] = result.finish_reason
        return prediction


def _as_assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}
