"""Llama 3's tokenizer as the Hub's files, for transformers and tools built on it (llama.cpp's
convert_hf_to_gguf.py): tokenizer.json, tokenizer_config.json (with the chat template) and
special_tokens_map.json, written from Meta's tiktoken tokenizer.model.

This library reads tokenizer.model itself (llama/tokenizer3.py); transformers reads
tokenizer.json, a byte-level BPE of the `tokenizers` library. The ranks become its vocabulary
and merges through transformers' TikTokenConverter, Meta's split pattern is its pre-tokenizer,
and the 256 special tokens are added tokens: the same ids for every text (tested against
Llama3Tokenizer). Needs transformers (`pip install -e ".[hf]"`).
"""

import json
from pathlib import Path

from llama.tokenizer3 import BASE_TOKENS, PAT_STR, SPECIAL_TOKENS

# eos: the end of a chat turn, as the Hub's instruct models name it (generation_config.json
# lists every id that ends a generation: <|end_of_text|>, <|eom_id|>, <|eot_id|>)
BOS, EOT = "<|begin_of_text|>", "<|eot_id|>"

# The format of llama/chat_format3.py for system, user, assistant (and ipython) turns: each
# turn's header, its content as given (Meta's llama_models does not strip it), <|eot_id|>; the
# assistant's header last for the model to answer. transformers encodes the rendered text in
# one piece where Meta encodes "\n\n" and the content apart: the same tokens, except for a
# content that starts with a line break (its newlines then join the header's).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")


def write_tokenizer_files(tokenizer_model: Path, dst: Path, max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json in `dst` for Llama 3's
    tiktoken `tokenizer_model`. Raises ImportError without transformers."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tokenizer = TikTokenConverter(vocab_file=str(tokenizer_model), pattern=PAT_STR,
                                  extra_special_tokens=SPECIAL_TOKENS).converted()
    if tokenizer.get_vocab_size() != BASE_TOKENS + len(SPECIAL_TOKENS):
        raise ValueError(f"{tokenizer_model}: expected {BASE_TOKENS} ranks and "
                         f"{len(SPECIAL_TOKENS)} special tokens, got "
                         f"{tokenizer.get_vocab_size()} ids")
    # BOS first, as Llama3Tokenizer.encode(bos=True) and the Hub's Llama 3 files give it
    bos_id = BASE_TOKENS + SPECIAL_TOKENS.index(BOS)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS}:0 $A:0",
                                      pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                      special_tokens=[(BOS, bos_id)])])
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(dst / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOT}
    added = {str(BASE_TOKENS + i): {"content": token, "lstrip": False, "normalized": False,
                                    "rstrip": False, "single_word": False, "special": True}
             for i, token in enumerate(SPECIAL_TOKENS)}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "pad_token": None,
              "added_tokens_decoder": added, "chat_template": CHAT_TEMPLATE,
              "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids",
                                                                          "attention_mask"],
              "model_max_length": max_length}
    for name, value in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (dst / name).write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
