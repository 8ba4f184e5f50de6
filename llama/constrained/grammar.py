"""Grammars for constrained decoding: what a caller asks for (a JSON schema, any JSON object, a
regex, a Lark grammar), compiled by llguidance against the tokenizer's vocabulary, once per
grammar (an LRU cache of matchers in their start state; each request takes a copy).

The vocabulary is read from the tokenizer: SentencePiece's pieces (Llama 2) here, a tokenizer
with `token_bytes()` (Llama 3's tiktoken) gives its own bytes per id. A complete answer may end
with any of the tokenizer's stop tokens (Llama 3's end of turn, of message, of text). See
docs/STRUCTURED_OUTPUT.md for why llguidance.
"""

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import llguidance

from llama.tokenizers import stop_tokens

KINDS = ("json_schema", "json_object", "regex", "lark")
CACHE_SIZE = 64  # compiled grammars kept (each a matcher in its start state)


class GrammarError(ValueError):
    """A grammar, schema or regex that cannot be compiled; the message says why."""


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match. kind: one of KINDS; text: the schema as canonical JSON
    (json_schema), the regex, or the Lark grammar ("" for json_object)."""
    kind: str
    text: str = ""

    @staticmethod
    def json_schema(schema: Any) -> "GrammarSpec":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as error:
                raise GrammarError(f"the JSON schema is not valid JSON ({error})") from None
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be a JSON object, got "
                               f"{type(schema).__name__}")
        return GrammarSpec("json_schema", json.dumps(schema))  # key order is answer order

    @staticmethod
    def json_object() -> "GrammarSpec":
        return GrammarSpec("json_object")

    @staticmethod
    def regex(pattern: str) -> "GrammarSpec":
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError(f"a regex must be a non-empty str, got {pattern!r}")
        return GrammarSpec("regex", pattern)

    @staticmethod
    def lark(grammar: str) -> "GrammarSpec":
        if not isinstance(grammar, str) or not grammar.strip():
            raise GrammarError(f"a Lark grammar must be a non-empty str, got {grammar!r}")
        return GrammarSpec("lark", grammar)


def closed_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object schema that lists
    `properties` and says nothing about others: answers then hold only the named keys, in
    order (as OpenAI's strict mode requires, and what a closing answer needs to reach the
    required ones). Every such answer still validates against the original schema."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed_objects(value) if key not in ("enum", "const", "default", "examples")
           else value for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def _lark_source(spec: GrammarSpec) -> str:
    """A llguidance grammar for spec. JSON answers may start with one space: SentencePiece
    writes a word-initial space into the first token ("▁{"), which decoding drops; forbidding
    it would force a trained model off its likeliest first token. Otherwise only compact
    JSON: no whitespace between tokens (a weak model fills unbounded whitespace)."""
    if spec.kind in ("json_schema", "json_object"):
        schema = (closed_objects(json.loads(spec.text)) if spec.kind == "json_schema"
                  else {"type": "object"})
        schema = dict(schema)
        guidance = dict(schema.get("x-guidance", {}))
        guidance.update(whitespace_flexible=False)
        schema["x-guidance"] = guidance
        return f'start: " "? answer\nanswer: %json {json.dumps(schema)}\n'
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.text)
    if spec.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(spec.text)
    raise GrammarError(f"grammar kind must be one of {', '.join(KINDS)}, got {spec.kind!r}")


# ---------------------------------------------------------------------------- vocabulary
def sentencepiece_token_bytes(sp_model) -> Tuple[List[bytes], List[int]]:
    """Each id's bytes as it appears in text (▁ is a space, <0xNN> byte pieces their byte),
    and the special ids (unk, bos, eos and other control pieces), marked with a leading 0xff
    as llguidance expects so that they never match text."""
    tokens, special = [], []
    for i in range(sp_model.vocab_size()):
        piece = sp_model.id_to_piece(i)
        if sp_model.is_byte(i):
            tokens.append(bytes([int(piece[3:-1], 16)]))  # "<0x0A>"
        elif sp_model.is_control(i) or sp_model.is_unknown(i):
            tokens.append(b"\xff" + piece.encode())
            special.append(i)
        else:
            tokens.append(piece.replace("\u2581", " ").encode())
    return tokens, special


class _Wrapper:
    """The shape llguidance.TokenizerWrapper reads a tokenizer through."""

    def __init__(self, tokens, special, bos_id, eos_id, encode):
        self.tokens, self.special_token_ids = tokens, special
        self.bos_token_id, self.eos_token_id = bos_id, eos_id
        self._encode = encode

    def __call__(self, text):
        return self._encode(text.decode("utf-8", "replace") if isinstance(text, bytes)
                            else text)


class Vocabulary:
    """A tokenizer as llguidance sees it, plus each id's bytes (for choosing closing tokens).
    `n_vocab` may exceed the tokenizer's size (a model's padded output): the extra ids are
    never allowed."""

    def __init__(self, tokens: List[bytes], special: List[int], bos_id: int, eos_id: int,
                 encode, n_vocab: Optional[int] = None, stop_ids: Optional[List[int]] = None):
        n_vocab = max(n_vocab or len(tokens), len(tokens))
        self.tokens = tokens + [b""] * (n_vocab - len(tokens))
        self.eos_id, self.n_vocab = eos_id, n_vocab
        self.stop_ids = list(stop_ids or [eos_id])  # any of them ends a complete answer
        wrapper = _Wrapper(self.tokens, special, bos_id, eos_id, encode)
        self.ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper), n_vocab=n_vocab,
                                         eos_token=self.stop_ids)
        self._matchers: "OrderedDict[GrammarSpec, llguidance.LLMatcher]" = OrderedDict()
        self._lock = threading.Lock()  # the server compiles on its HTTP threads
        self.ranks = self.order = None  # closing's preferences (constraint.py), on first use

    def matcher(self, spec: GrammarSpec) -> "llguidance.LLMatcher":
        """A matcher for spec in its start state: compiled once, then copied from the cache."""
        with self._lock:
            template = self._matchers.get(spec)
            if template is not None:
                self._matchers.move_to_end(spec)
                return template.deep_copy()
        template = self._compile(spec)
        with self._lock:
            self._matchers[spec] = template
            while len(self._matchers) > CACHE_SIZE:
                self._matchers.popitem(last=False)
        return template.deep_copy()

    def _compile(self, spec: GrammarSpec) -> "llguidance.LLMatcher":
        try:
            source = _lark_source(spec)
        except (ValueError, TypeError) as error:
            raise GrammarError(f"cannot compile the {spec.kind} ({error})") from None
        matcher = llguidance.LLMatcher(self.ll, source, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"cannot compile the {spec.kind}: {matcher.get_error()}")
        return matcher

    @property
    def cached(self) -> int:
        return len(self._matchers)


_VOCABULARIES: Dict[int, Tuple[Any, Vocabulary]] = {}


def vocabulary(tokenizer, n_vocab: Optional[int] = None) -> Vocabulary:
    """The Vocabulary of a tokenizer, built once per tokenizer object (it takes ~0.1 s for
    32000 pieces). A tokenizer with `token_bytes()` (-> (bytes per id, special ids)) gives
    its own; a SentencePiece one (`sp_model`) is read here."""
    key = id(tokenizer)
    known = _VOCABULARIES.get(key)
    if known is not None and known[0] is tokenizer and known[1].n_vocab >= (n_vocab or 0):
        return known[1]
    if hasattr(tokenizer, "token_bytes"):
        tokens, special = tokenizer.token_bytes()
    elif hasattr(tokenizer, "sp_model"):
        tokens, special = sentencepiece_token_bytes(tokenizer.sp_model)
    else:
        raise GrammarError(f"constrained decoding needs the tokenizer's vocabulary: "
                           f"{type(tokenizer).__name__} has neither token_bytes() nor sp_model")
    encode = (getattr(tokenizer, "encode_fragment", None)
              or _fragment_encoder(tokenizer, tokens))
    vocab = Vocabulary(tokens, special, tokenizer.bos_id, tokenizer.eos_id, encode, n_vocab,
                       stop_tokens(tokenizer))
    _VOCABULARIES[key] = (tokenizer, vocab)
    return vocab


def _fragment_encoder(tokenizer, tokens: List[bytes]):
    """encode(text) for text in the middle of an answer. SentencePiece starts every text with
    a space ("▁"); llguidance tokenizes the bytes a grammar forces, which follow other text.
    So the text is encoded after a newline (a byte piece, which merges with nothing) and the
    tokens up to it dropped. A model whose normalizer rewrites text (removing spaces at the
    end, collapsing runs of them) would give other bytes: then the text's bytes are spelled
    with byte pieces (<0xNN>), which a byte-fallback vocabulary has for every byte."""
    newline = tokens.index(b"\n") if b"\n" in tokens else None
    sp = getattr(tokenizer, "sp_model", None)
    byte_ids = ({i: sp.piece_to_id(f"<0x{i:02X}>") for i in range(256)}
                if sp is not None else {})

    def encode(text: str) -> List[int]:
        if newline is None:
            return tokenizer.encode(text, bos=False, eos=False)
        ids = tokenizer.encode("\n" + text, bos=False, eos=False)
        ids = ids[ids.index(newline) + 1:] if newline in ids else ids
        raw = text.encode("utf-8")
        if b"".join(tokens[i] for i in ids) != raw and all(
                tokens[byte_ids.get(b, 0)] == bytes([b]) for b in raw):
            return [byte_ids[b] for b in raw]
        return ids
    return encode
