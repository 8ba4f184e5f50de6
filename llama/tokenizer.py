"""SentencePiece tokenizer with Llama's special ids (unk 0, bos 1, eos 2, no pad): Llama 2's.
Llama 3's is llama/tokenizer3.py; llama/tokenizers.py opens either."""

import functools
import os
from typing import List, Tuple

from sentencepiece import SentencePieceProcessor

from llama.errors import ArgumentFileNotFoundError, ArgumentValueError


class Tokenizer:
    family = "llama2"

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise ArgumentFileNotFoundError(
                "model_path", f"model_path {model_path!r} is not a file: it should be the "
                              f"tokenizer.model downloaded with the weights")
        try:
            self.sp_model = SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as error:
            raise ArgumentValueError(
                "model_path", f"model_path {model_path!r} is neither a SentencePiece model "
                              f"(Llama 2) nor a tiktoken BPE file (Llama 3) ({error}); "
                              f"re-download tokenizer.model and check it against "
                              f"tokenizer_checklist.chk") from None
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()  # -1: Llama's tokenizer has no pad piece
        self.stop_tokens: List[int] = [self.eos_id]

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}")
        t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t) -> str:
        return self.sp_model.decode(t)

    @functools.cached_property
    def longest_token(self) -> int:
        """The most characters one token stands for (bounds a text's token count)."""
        return max(len(self.sp_model.id_to_piece(i)) for i in range(self.n_words))

    def token_text(self, token: int) -> Tuple[str, List[int]]:
        """A token's text as it sits inside a longer text (SentencePiece's ▁ is a space),
        and its UTF-8 bytes; a byte-fallback token is its one byte."""
        piece = self.sp_model.id_to_piece(token)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            byte = int(piece[3:5], 16)
            return (chr(byte) if byte < 0x80 else ""), [byte]
        text = piece.replace("\u2581", " ")
        return text, list(text.encode("utf-8"))
