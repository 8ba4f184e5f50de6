"""Meta's own Llama 3 tokenizer and chat format (the `llama-models` package, a test-only
dependency) as the oracle for ours, and the tokenizer.model file it ships."""

from pathlib import Path

import pytest


def meta_package():
    """llama_models, or a failure saying how to get it (never a skip: without it the Llama 3
    tests would check nothing)."""
    try:
        import llama_models
    except ImportError:
        pytest.fail("the Llama 3 tests need Meta's llama-models package as their reference: "
                    "pip install -r requirements-dev.txt")
    return llama_models


def meta_tokenizer_path() -> str:
    """Meta's Llama 3 tokenizer.model (the same file as in every Llama 3.x download)."""
    path = Path(meta_package().__file__).parent / "llama3" / "tokenizer.model"
    assert path.is_file(), f"llama-models no longer ships {path}"
    return str(path)


def meta_tokenizer():
    meta_package()
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(Path(meta_tokenizer_path()))


def meta_dialog_tokens(tokenizer, dialog):
    """Meta's ChatFormat.encode_dialog_prompt for a dialog of {"role", "content"} dicts."""
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat

    messages = [RawMessage(role=m["role"], content=m["content"]) for m in dialog]
    return ChatFormat(tokenizer).encode_dialog_prompt(messages).tokens
