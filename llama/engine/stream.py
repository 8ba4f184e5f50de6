"""A streamed answer (Llama.stream_text, Llama.stream_chat): iterate for text pieces on rank 0
while every rank runs the same steps."""

from typing import Iterator, List, Optional

from llama.chat_format import UNSAFE_ERROR
from llama.constrained.spec import check_no_stop
from llama.engine.distributed import is_main_process
from llama.engine.results import FinishReason
from llama.engine.validation import check_generation_arguments


class TextStream:
    """Iterate for text pieces; afterwards `text`, `tokens` and `finish_reason` are set."""

    def __init__(self, llama, prompt_tokens, max_gen_len, temperature, top_p, stop,
                 cancel=None, spec=None, after_prompt=False, name="prompt"):
        self._llama, self._prompt_tokens = llama, prompt_tokens
        if max_gen_len is None:
            max_gen_len = llama.model.params.max_seq_len - 1
        self._args = (max_gen_len, temperature, top_p, stop)
        self._cancel, self._spec, self._after_prompt = cancel, spec, after_prompt
        self._name = name  # what errors call it
        check_no_stop(spec, stop)
        if prompt_tokens is not None:  # bad arguments fail here, not when iterated
            check_generation_arguments([prompt_tokens], max_gen_len, temperature, top_p, stop,
                                       llama.model.params, llama.tokenizer.n_words, [name])
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
        results = yield from _only_on_main(self._llama._generate(
            [self._prompt_tokens], max_gen_len, temperature, top_p, False, False, stop,
            stream=True, names=[self._name], cancel=self._cancel, spec=self._spec,
            after_prompt=self._after_prompt))
        self.text, self.tokens, self.finish_reason = results[0].text, results[0].tokens, \
            results[0].finish_reason


def drain(generator):
    """Run a generator to its end; its return value."""
    while True:
        try:
            next(generator)
        except StopIteration as finished:
            return finished.value


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
