"""A chat that keeps its keys and values between turns (Llama.chat_session).

chat_completion prefills the whole dialog every call: a long conversation costs more at each
turn. A session keeps one KV cache row of its own and remembers which tokens it holds. Each
turn's prompt is the conversation in the chat format of the tokenizer's family; the part of it that
the row
already holds is kept, and only the rest is prefilled.

The format's answers can be kept two ways:
- as the model generated them (default): an exchange is `<s>[INST] user [/INST]`, the
  answer's own tokens, then EOS. The next turn prefills EOS and the new `<s>[INST] ... [/INST]`
  only. An answer is then the one the whole conversation's tokens give without a cache.
- `retokenize=True`: the answers' text encoded again, as chat_completion does
  (dialog_to_tokens). Answers equal chat_completion's for the same dialog, but where the
  model's tokens are not the tokenizer's own encoding of its text (Llama 2 chat begins its
  answers with a lone "▁"), the answer is prefilled again from there.

When the conversation would leave less than `reply_room` tokens for an answer, the oldest
exchanges are dropped (whole, the system prompt kept) and what remains is prefilled again
from where it changed (the system prompt's tokens still begin it). Seeded sampling draws the
same random numbers as chat_completion does for one dialog.
"""

from typing import Callable, Iterator, List, Optional, Sequence

import torch

from llama import chat_format3
from llama.chat_format import B_INST, E_INST, UNSAFE_ERROR, Dialog, fold_system_prompt
from llama.chat_formats import dialog_tokens, has_special_tags
from llama.constrained.spec import check_no_stop, make_constraint, response_format_spec
from llama.engine.core import Engine, EngineSequence
from llama.engine.distributed import broadcast_object, is_main_process
from llama.engine.results import FinishReason, finish
from llama.engine.sampling import ReferenceNoise
from llama.engine.text import TextTracker
from llama.engine.validation import (
    ArgumentTypeError,
    ArgumentValueError,
    check_generation_arguments,
)
from llama.tokenizers import family, stop_tokens


class ChatSession:
    """A conversation with the model; see Llama.chat_session."""

    def __init__(self, llama, system: Optional[str] = None, reply_room: Optional[int] = None,
                 retokenize: bool = False):
        max_seq_len = llama.model.params.max_seq_len
        if system is not None and not isinstance(system, str):
            raise ArgumentTypeError("system", f"system must be a str or None, got "
                                              f"{type(system).__name__}")
        if system is not None and has_special_tags(llama.tokenizer,
                                                   [{"role": "system", "content": system}]):
            raise ArgumentValueError("system", f"the system prompt may not contain the chat "
                                               f"format's tags ({UNSAFE_ERROR})")
        if reply_room is None:
            reply_room = max(16, max_seq_len // 4)
        if isinstance(reply_room, bool) or not isinstance(reply_room, int) or not (
                0 < reply_room < max_seq_len):
            raise ArgumentValueError("reply_room", f"reply_room must be an int from 1 to "
                                                   f"max_seq_len - 1 = {max_seq_len - 1} (tokens "
                                                   f"kept free for an answer), got "
                                                   f"{reply_room!r}")
        self._llama, self.system, self.reply_room = llama, system, reply_room
        self.retokenize = bool(retokenize)
        self._start: Dialog = [{"role": "system", "content": system}] if system else []
        self.messages: Dialog = list(self._start)
        self._answers: List[List[int]] = []  # each assistant message's tokens, as generated
        self._cache = None  # one row of max_seq_len slots, allocated at the first turn
        self._cached: List[int] = []  # the tokens whose keys and values the row holds, in order

    @property
    def cached_tokens(self) -> int:
        """Tokens of the conversation whose keys and values are in the session's cache."""
        return len(self._cached)

    def send(self, content: str, temperature: float = 0.6, top_p: float = 0.9,
             max_gen_len: Optional[int] = None, stop: Optional[Sequence[str]] = None,
             response_format=None) -> str:
        """Say `content` as the user; returns the assistant's answer, which joins the
        conversation. Sampling arguments and response_format as in chat_completion; every
        rank must call it."""
        turn = self.stream(content, temperature, top_p, max_gen_len, stop,
                           response_format=response_format)
        for _ in turn:
            pass
        return turn.text

    def stream(self, content: str, temperature: float = 0.6, top_p: float = 0.9,
               max_gen_len: Optional[int] = None, stop: Optional[Sequence[str]] = None,
               cancel: Optional[Callable[[], bool]] = None, response_format=None) -> "Turn":
        """As send, yielding the answer's text as it is generated (see Llama.stream_chat,
        `cancel` included: a cancelled answer joins the conversation as far as it went).
        Oldest exchanges that must go to leave `reply_room` tokens are dropped now (the
        turn's `dropped` says how many messages); a message too long to fit even alone with
        the system prompt raises ArgumentValueError, and the conversation stays as it was."""
        if not isinstance(content, str):
            raise ArgumentTypeError("content", f"content must be a str, got "
                                               f"{type(content).__name__}")
        spec = response_format_spec(response_format)
        dialog = self.messages + [{"role": "user", "content": content}]
        if has_special_tags(self._llama.tokenizer, dialog):  # refused, as chat_completion does
            return Turn(self, None, dialog, [], 0, max_gen_len, temperature, top_p, stop,
                        cancel)
        params = self._llama.model.params
        room = params.max_seq_len - self.reply_room
        start = len(self._start)
        exchanges = (len(dialog) - start) // 2
        for drop in range(exchanges + 1):  # drop the oldest exchanges until it fits
            fitted = self._start + dialog[start + 2 * drop:]
            answers = self._answers[drop:]
            tokens = self._format(fitted, answers)
            if len(tokens) <= room:
                return Turn(self, tokens, fitted, answers, 2 * drop, max_gen_len, temperature,
                            top_p, stop, cancel, spec)
        raise ArgumentValueError(
            "content", f"this message takes {len(tokens)} tokens with the system prompt; a turn "
                       f"may take {room} (max_seq_len {params.max_seq_len} less reply_room "
                       f"{self.reply_room}): shorten it, or build with a larger max_seq_len")

    def _format(self, dialog: Dialog, answers: List[List[int]]) -> List[int]:
        """The tokens of `dialog` (the last message the user's) in the chat format of the
        tokenizer's family; `answers`: its assistant messages' tokens, as generated."""
        tokenizer = self._llama.tokenizer
        if self.retokenize:
            return dialog_tokens(tokenizer, dialog)
        if family(tokenizer) == "llama3":  # each answer: its header, its tokens, <|eot_id|>
            tokens = [tokenizer.bos_id]
            generated = iter(answers)
            for message in dialog:
                if message["role"] == "assistant":
                    tokens += (chat_format3.header_tokens("assistant", tokenizer)
                               + next(generated) + [tokenizer.special_tokens["<|eot_id|>"]])
                else:
                    tokens += chat_format3.message_tokens(message, tokenizer)
            return tokens + chat_format3.header_tokens("assistant", tokenizer)
        encode = tokenizer.encode
        folded = fold_system_prompt(dialog)
        tokens: List[int] = []
        for prompt, answer in zip(folded[::2], answers):
            tokens += encode(f"{B_INST} {prompt['content'].strip()} {E_INST}", bos=True,
                             eos=False)
            tokens += answer + [self._llama.tokenizer.eos_id]
        tokens += encode(f"{B_INST} {folded[-1]['content'].strip()} {E_INST}", bos=True,
                         eos=False)
        return tokens

    def reset(self) -> None:
        """Forget the conversation but the system prompt (whose tokens stay cached)."""
        self.messages, self._answers = list(self._start), []

    def free_cache(self) -> None:
        """Release the session's cache (the next turn prefills the whole conversation)."""
        self._cache, self._cached = None, []

    def _row(self):
        if self._cache is None:
            model = self._llama.model
            self._cache = model.new_cache(1, model.params.max_seq_len)
        return self._cache


class Turn:
    """One answer of a session. Iterate for text pieces (on rank 0; every rank must iterate);
    afterwards `text`, `tokens` and `finish_reason` are set, and the exchange is part of the
    session. `reused`: prompt tokens found in the cache; `prefilled`: those the model ran on;
    `dropped`: oldest messages dropped to make room."""

    def __init__(self, session: ChatSession, prompt: Optional[List[int]], dialog: Dialog,
                 answers: List[List[int]], dropped: int, max_gen_len, temperature, top_p, stop,
                 cancel, spec=None):
        llama = session._llama
        if max_gen_len is None:
            max_gen_len = llama.model.params.max_seq_len - 1
        self._session, self._prompt, self._dialog = session, prompt, dialog
        self._answers = answers
        self.prompt_tokens = prompt  # the conversation as the model reads it this turn
        self._stop = []
        if prompt is not None:  # bad arguments fail here, not when iterated
            self._stop = check_generation_arguments([prompt], max_gen_len, temperature, top_p,
                                                    stop, llama.model.params,
                                                    llama.tokenizer.n_words)
        self._args = (max_gen_len, temperature, top_p)
        self._cancel, self._spec = cancel, spec
        check_no_stop(spec, stop)
        self.dropped = dropped
        self.reused = self.prefilled = 0
        self.text: Optional[str] = None
        self.tokens: Optional[List[int]] = None
        self.finish_reason: Optional[FinishReason] = None

    def __iter__(self) -> Iterator[str]:
        if self._prompt is None:  # refused: the session stays as it was
            self.text, self.tokens, self.finish_reason = UNSAFE_ERROR, [], "stop"
            if is_main_process():
                yield UNSAFE_ERROR
            return
        main = is_main_process()
        for piece in self._generate():
            if main:
                yield piece

    @torch.inference_mode()
    def _generate(self) -> Iterator[str]:
        session, prompt = self._session, self._prompt
        llama = session._llama
        model, tokenizer = llama.model, llama.tokenizer
        max_gen_len, temperature, top_p = self._args
        # The row's tokens that begin this prompt stay; at least the last prompt token is run
        # again, for the first logits. From here on the row past them is overwritten.
        self.reused = min(_common_prefix(session._cached, prompt), len(prompt) - 1)
        self.prefilled = len(prompt) - self.reused
        session._cached = session._cached[: self.reused]
        limit = min(max_gen_len, model.params.max_seq_len - len(prompt))
        seq = EngineSequence(prompt=prompt, limit=limit, temperature=temperature, top_p=top_p,
                             text=TextTracker(tokenizer, self._stop))
        if self._spec is not None:  # the answer must match it (llama/constrained/spec.py)
            seq.constraint = make_constraint(tokenizer, model.params.vocab_size, self._spec,
                                             limit)
        engine = Engine(model, stop_tokens(tokenizer), session._row())
        engine.add(seq, cached=self.reused)
        if temperature > 0:  # chat_completion's random draws for this dialog (one row)
            noise = ReferenceNoise([len(prompt)], [0], model.params.vocab_size, engine.device)
            engine.batch = (temperature, top_p, noise)
        while not seq.finished:
            engine.step()
            piece = seq.text.piece()
            if piece:
                yield piece
            if self._cancel is not None and broadcast_object(bool(self._cancel())):
                seq.finish_reason = seq.finish_reason or "cancelled"
        rest = seq.text.rest()
        if rest:
            yield rest
        result = finish(seq, False, None, stop_tokens(tokenizer))
        self.text, self.tokens, self.finish_reason = result.text, result.tokens, \
            result.finish_reason
        # the tokens the model ran on are in the row: the prompt, then the answer but its last
        session._cached = (prompt + seq.tokens)[: seq.position]
        session.messages = self._dialog + [{"role": "assistant", "content": self.text}]
        session._answers = self._answers + [list(self.tokens)]


def _common_prefix(a: List[int], b: List[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
