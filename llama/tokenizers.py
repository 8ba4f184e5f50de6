"""Which tokenizer a tokenizer.model is: Llama 2's SentencePiece model or Llama 3's tiktoken BPE
file (Meta names both tokenizer.model). Everything that opens a tokenizer goes through
load_tokenizer; what differs between the families (stop tokens, chat format) is asked of the
tokenizer it returns."""

import os
from typing import List, Union

from llama.errors import ArgumentFileNotFoundError
from llama.tokenizer import Tokenizer
from llama.tokenizer3 import Llama3Tokenizer, looks_like_bpe_file

AnyTokenizer = Union[Tokenizer, Llama3Tokenizer]


def load_tokenizer(model_path: str) -> AnyTokenizer:
    """The tokenizer in `model_path`: a Llama3Tokenizer for a tiktoken BPE file, else a
    (SentencePiece) Tokenizer. Errors are ArgumentErrors naming `model_path`."""
    model_path = os.fspath(model_path)
    if not os.path.isfile(model_path):
        raise ArgumentFileNotFoundError(
            "model_path", f"model_path {model_path!r} is not a file: it should be the "
                          f"tokenizer.model downloaded with the weights")
    with open(model_path, "rb") as f:
        head = f.read(256)
    if looks_like_bpe_file(head):
        return Llama3Tokenizer(model_path)
    return Tokenizer(model_path)


def family(tokenizer) -> str:
    """"llama3" or "llama2"; tokenizers made elsewhere (tests, benchmarks) count as Llama 2's."""
    return getattr(tokenizer, "family", "llama2")


def stop_tokens(tokenizer) -> List[int]:
    """The token ids that end a generation: Llama 2's EOS; Llama 3's end of text, end of turn
    and end of message."""
    return list(getattr(tokenizer, "stop_tokens", [tokenizer.eos_id]))
