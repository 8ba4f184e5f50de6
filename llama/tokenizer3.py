"""The Llama 3 tokenizer: tiktoken byte-level BPE over Meta's tokenizer.model (128,000 ranked
byte strings, one base64 line each), Meta's pre-split pattern, and 256 special tokens after the
ranks (ids 128000-128255). The same interface as the Llama 2 tokenizer (llama/tokenizer.py)."""

import base64
import binascii
import os
import re
from typing import Dict, Iterator, List, Sequence, Tuple, Union

from llama.errors import ArgumentFileNotFoundError, ArgumentValueError

# Llama 3, 3.1, 3.2 and 3.3 share this vocabulary.
BASE_TOKENS = 128_000
N_SPECIAL = 256

# Meta's split pattern (llama_models/llama3/tokenizer.py): contractions, letter runs with one
# leading non-letter, digits in threes, punctuation runs, newlines, other whitespace.
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# The named special tokens, in id order from 128000; the rest of the 256 are reserved. Names
# as Meta gives them since Llama 3.1 (3.0 called 128004, 128005, 128008, 128010 and 128011
# reserved; the ids that matter, bos/eos/headers/eot, never moved).
NAMED_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                 "<|python_tag|>", "<|image|>"]
SPECIAL_TOKENS = NAMED_SPECIAL + [f"<|reserved_special_token_{2 + i}|>"
                                  for i in range(N_SPECIAL - len(NAMED_SPECIAL))]

# tiktoken's Rust core overflows its stack on very long runs without a split point
# (openai/tiktoken#195), so text is fed to it in pieces: at most this many characters, and runs
# of whitespace or of non-whitespace at most this long. Meta cuts at the same places, so the
# tokens of such text stay Meta's.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

_BPE_LINE = re.compile(rb"[A-Za-z0-9+/]+=*[ \t]+[0-9]+\r?\n?")


def looks_like_bpe_file(head: bytes) -> bool:
    """Whether the first bytes of a file are tiktoken's BPE format (base64 rank lines), as
    Llama 3's tokenizer.model is; SentencePiece's is a binary protobuf."""
    first_line = head.split(b"\n", 1)[0] + b"\n"
    return _BPE_LINE.fullmatch(first_line) is not None


def read_bpe_ranks(model_path: str) -> Dict[bytes, int]:
    """{token bytes: rank} from a tiktoken BPE file; a malformed line is an error naming it."""
    ranks: Dict[bytes, int] = {}
    with open(model_path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ArgumentValueError(
                    "model_path", f"model_path {model_path!r} line {number} is not "
                                  f"'<base64 token> <rank>': the file is damaged; re-download "
                                  f"tokenizer.model") from None
    return ranks


class Llama3Tokenizer:
    family = "llama3"

    def __init__(self, model_path: str):
        import tiktoken  # only Llama 3 models need it

        if not os.path.isfile(model_path):
            raise ArgumentFileNotFoundError(
                "model_path", f"model_path {model_path!r} is not a file: it should be the "
                              f"tokenizer.model downloaded with the weights")
        ranks = read_bpe_ranks(model_path)
        if len(ranks) != BASE_TOKENS or sorted(ranks.values()) != list(range(BASE_TOKENS)):
            raise ArgumentValueError(
                "model_path", f"model_path {model_path!r} is a tiktoken BPE file of "
                              f"{len(ranks)} tokens, not Llama 3's ({BASE_TOKENS} tokens ranked "
                              f"0-{BASE_TOKENS - 1}); this library reads Llama 2's and Llama "
                              f"3.x's tokenizers only")
        self.special_tokens: Dict[str, int] = {name: BASE_TOKENS + i
                                               for i, name in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=os.path.basename(model_path), pat_str=PAT_STR,
                                       mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.n_words: int = BASE_TOKENS + N_SPECIAL
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        # Any of these ends a generation: end of text (base models), end of turn (chat), end of
        # message (a 3.1+ chat model handing over to a tool).
        self.stop_tokens: List[int] = [self.eos_id, self.eot_id, self.eom_id]
        # the most characters one token stands for (its bytes bound them)
        self.longest_token: int = max(len(piece) for piece in ranks)

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Token ids of `s`. Text that spells a special token ("<|eot_id|>") is ordinary text
        here, as in Meta's encode: only the chat format puts special tokens in a prompt."""
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}")
        t: List[int] = [self.bos_id] if bos else []
        for begin in range(0, len(s), MAX_ENCODE_CHARS):
            for piece in split_long_runs(s[begin: begin + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
                t += self.model.encode(piece, allowed_special=set(), disallowed_special=())
        if eos:
            t.append(self.eos_id)
        return t

    def decode(self, t: Union[int, Sequence[int]]) -> str:
        """The text of token ids (or of one id, as SentencePiece's decode takes)."""
        # byte-level BPE: a token may hold part of a character; an incomplete one decodes to
        # U+FFFD, as SentencePiece's byte pieces do
        return self.model.decode([t] if isinstance(t, int) else list(t))

    def token_text(self, token: int) -> Tuple[str, List[int]]:
        """A token's text as it sits inside a longer text, and its bytes; a token holding only
        part of a character shows the characters it completes ("" if none)."""
        raw = self.model.decode_single_token_bytes(token)
        return raw.decode("utf-8", errors="ignore"), list(raw)

    def token_bytes(self) -> Tuple[List[bytes], List[int]]:
        """Each id's bytes, and the special ids, whose bytes are 0xff and their name (as the
        grammar engine, llguidance, expects them: they never match text)."""
        tokens = [self.model.decode_single_token_bytes(i) for i in range(BASE_TOKENS)]
        tokens += [b"\xff" + name.encode() for name in SPECIAL_TOKENS]
        return tokens, list(range(BASE_TOKENS, BASE_TOKENS + N_SPECIAL))

    def encode_fragment(self, text: str) -> List[int]:
        """Token ids of text in the middle of an answer (byte-level BPE adds nothing at the
        start of a text, unlike SentencePiece)."""
        return self.encode(text, bos=False, eos=False)


def split_long_runs(s: str, limit: int) -> Iterator[str]:
    """`s` in consecutive pieces, cut only inside a run of more than `limit` whitespace or
    non-whitespace characters, so that no piece holds a longer run."""
    start, run, run_is_space = 0, 0, s[:1].isspace()
    for i, char in enumerate(s):
        is_space = char.isspace()
        if is_space != run_is_space:
            run, run_is_space = 1, is_space
            continue
        run += 1
        if run > limit:
            yield s[start:i]
            start, run = i, 1
    yield s[start:]
