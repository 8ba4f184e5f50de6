"""The demo model bundled with the repository, and the text it was trained and evaluated on.

`llama/demo_model/` holds a small Llama-architecture checkpoint in Meta's layout (params.json,
consolidated.00.pth, checklist.chk, tokenizer.model), trained by scripts/train_demo_model.py on
the topic pages of Python's documentation that ship with CPython (`pydoc_data.topics`). Its
continuations are English-like words and phrases from those pages, not meaningful text: it lets
the example scripts run without Meta's weights. See docs/DEMO_MODEL.md.

The split of that text is defined here, so the training script and the tests use the same
held-out pages: every 10th topic (in sorted order) is held out, and no paragraph of a held-out
page is trained on (the pages repeat one another: "customization" is part of "specialnames").
"""

from pathlib import Path
from typing import Dict, List, Optional, Tuple

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo_model"
DEMO_CKPT_DIR = str(DEMO_DIR)
DEMO_TOKENIZER_PATH = str(DEMO_DIR / "tokenizer.model")

HELDOUT_EVERY = 10  # topic i (in sorted order) is held out when i % HELDOUT_EVERY == 0


def demo_model_message() -> str:
    """One line for people who ran an example without --ckpt_dir."""
    return ("No --ckpt_dir given: using the bundled demo model (llama/demo_model, a "
            "4.0M-parameter Llama-architecture model trained for 14 minutes on 2 CPU cores on "
            "Python's documentation; its text is English-like but not meaningful). Download "
            "real weights with download.sh.")


def _topics() -> Dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def _paragraphs(text: str) -> List[str]:
    """The paragraphs of a page. Prose is hard-wrapped at about 70 columns in these pages; its
    lines are joined with spaces, so that a line break is not the commonest token. Indented
    blocks (code, grammar, lists) and underlined titles keep their line breaks."""
    paragraphs = []
    for block in text.split("\n\n"):
        lines = block.strip().split("\n")
        if not lines[0]:
            continue
        prose = all(line and not line[0].isspace() and not set(line) <= set("*=-~^")
                    for line in lines)
        paragraphs.append(" ".join(lines) if prose else "\n".join(lines))
    return paragraphs


def split_topics() -> Tuple[List[str], List[str]]:
    """(training pages, held-out pages) of Python's documentation topics. Held out: every
    HELDOUT_EVERY-th topic in sorted key order. Training pages lose every paragraph that also
    occurs in a held-out page. Prose lines are unwrapped (see _paragraphs)."""
    topics = _topics()
    keys = sorted(topics)
    heldout = [topics[k] for i, k in enumerate(keys) if i % HELDOUT_EVERY == 0]
    seen = {p for page in heldout for p in _paragraphs(page)}
    training = []
    for i, key in enumerate(keys):
        if i % HELDOUT_EVERY != 0:
            kept = [p for p in _paragraphs(topics[key]) if p not in seen]
            if kept:
                training.append("\n\n".join(kept))
    return training, ["\n\n".join(_paragraphs(page)) for page in heldout]


def training_text() -> str:
    """The text the demo model (and its tokenizer) was trained on."""
    return "\n\n".join(split_topics()[0])


def heldout_text() -> str:
    """Documentation pages the demo model never saw, for measuring its perplexity."""
    return "\n\n".join(split_topics()[1])


def encode_pages(pages: List[str], tokenizer) -> Tuple[List[int], List[int]]:
    """One token stream of `pages` for a llama.tokenizer.Tokenizer, and the offsets in it where
    paragraphs start. Each paragraph is encoded alone, so it begins as an encoded prompt does
    ("\u2581The"); paragraphs are joined by two newline byte tokens and each page ends with
    EOS."""
    newline = tokenizer.sp_model.piece_to_id("<0x0A>")
    tokens: List[int] = []
    starts: List[int] = []
    for page in pages:
        for index, paragraph in enumerate(_paragraphs(page)):
            if index:
                tokens += [newline, newline]
            starts.append(len(tokens))
            tokens += tokenizer.encode(paragraph, bos=False, eos=False)
        tokens.append(tokenizer.eos_id)
    return tokens, starts


def windows(tokens: List[int], starts: List[int], length: int, bos_id: int,
            count: Optional[int] = None) -> List[List[int]]:
    """Non-overlapping windows of `length` tokens: BOS, then length - 1 tokens of the stream
    from a paragraph start (the first one at or after the end of the previous window). The
    first `count` of them (all when None)."""
    out: List[List[int]] = []
    end = 0
    for start in starts:
        if start < end:
            continue
        if start + length - 1 > len(tokens) or (count is not None and len(out) == count):
            break
        out.append([bos_id] + tokens[start: start + length - 1])
        end = start + length - 1
    return out


def heldout_windows(tokenizer, length: int, count: Optional[int] = None) -> List[List[int]]:
    """Windows of held-out text (see `windows`), as the training script evaluates them."""
    tokens, starts = encode_pages(split_topics()[1], tokenizer)
    return windows(tokens, starts, length, tokenizer.bos_id, count)
