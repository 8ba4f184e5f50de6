"""Hugging Face's `config.json` for Llama, both ways: read into `ModelArgs` (refusing what this
library cannot run exactly), and written from `ModelArgs` the way transformers' `LlamaConfig`
expects.

A config names its shapes directly (`hidden_size`, `intermediate_size`, ...) where Meta's
params.json gives the rule that derives the feed-forward width (`multiple_of`,
`ffn_dim_multiplier`); `ffn_params` finds rule parameters that reproduce a given width exactly.
"""

import json
from pathlib import Path
from typing import Optional, Tuple

from llama.args import ModelArgs
from llama.checkpoints.meta import CheckpointError
from llama.rope_scaling import RopeScaling, RopeScalingError

# What transformers' LlamaConfig assumes when a field is absent.
DEFAULT_RMS_NORM_EPS = 1e-6
DEFAULT_ROPE_THETA = 10000.0
REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "vocab_size")
# Meta's own -hf conversions use these ids and this context length for Llama 2.
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0
LLAMA2_CONTEXT = 4096
# ... and these for Llama 3.x: <|begin_of_text|>, and the ends Meta's generation stops at
# (<|end_of_text|>, <|eom_id|>, <|eot_id|>), as the Hub's 3.1+ configs list them.
LLAMA3_BOS_ID, LLAMA3_EOS_IDS, LLAMA3_VOCAB = 128000, [128001, 128008, 128009], 128256
LLAMA3_CONTEXT, LLAMA31_CONTEXT = 8192, 131072


class UnsupportedConfigError(CheckpointError):
    """A config.json describing a model this library cannot run exactly (it is refused rather
    than run approximately)."""


def read_config(path: Path) -> dict:
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); re-download it") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object (a transformers model config)")
    return config


def _refuse(path: Path, field: str, value, why: str) -> None:
    raise UnsupportedConfigError(
        f"{path}: {field}={value!r} is not supported: {why}. This library runs Llama's "
        f"architecture (Llama 2 and 3.x) exactly and refuses other models rather than run "
        f"them approximately")


def check_supported(config: dict, path: Path) -> None:
    """Refuse, naming the field and its value, every setting whose model differs from Llama's
    architecture (a model run without it would give wrong outputs, not an error)."""
    model_type = config.get("model_type")
    if model_type != "llama":
        _refuse(path, "model_type", model_type,
                "only Llama checkpoints (model_type \"llama\", LlamaForCausalLM) can be loaded")
    architectures = config.get("architectures")
    if architectures is not None and architectures != ["LlamaForCausalLM"]:
        _refuse(path, "architectures", architectures,
                "only LlamaForCausalLM (a language-model head on the Llama body) can be loaded")
    rope_scaling(config, path)  # refuses kinds it does not implement, by name
    for field in ("attention_bias", "mlp_bias"):
        if config.get(field, False) is not False:
            _refuse(path, field, config[field],
                    "Llama 2's attention and feed-forward projections have no bias")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        _refuse(path, "hidden_act", act, "Llama 2's feed-forward is SwiGLU, with silu")
    if config.get("quantization_config") is not None:
        _refuse(path, "quantization_config", config["quantization_config"],
                "quantized weights (GPTQ, AWQ, bitsandbytes, ...) cannot be read; use the "
                "model's float16/bfloat16/float32 weights")
    head_dim = config.get("head_dim")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if head_dim is not None and isinstance(hidden, int) and isinstance(heads, int) and heads \
            and head_dim != hidden // heads:
        _refuse(path, "head_dim", head_dim,
                f"Llama 2's heads are hidden_size / num_attention_heads = {hidden // heads} wide")


def rope_scaling(config: dict, path: Path) -> Optional[RopeScaling]:
    """The scaled rotary frequencies `rope_scaling` (or transformers 5's `rope_parameters`)
    asks for, with the numbers transformers fills in: llama3's original context from a
    top-level original_max_position_embeddings, else its entry, else max_position_embeddings;
    dynamic's threshold is max_position_embeddings."""
    found = {}
    for field in ("rope_scaling", "rope_parameters"):
        entry = config.get(field)
        if isinstance(entry, dict) and entry.get("rope_type", entry.get("type")) in (
                "llama3", "dynamic"):
            entry = dict(entry)
            context = config.get("max_position_embeddings", 2048)  # LlamaConfig's default
            kind = entry.get("rope_type", entry.get("type"))
            if kind == "llama3":
                context = config.get("original_max_position_embeddings",
                                     entry.get("original_max_position_embeddings", context))
            elif entry.get("original_max_position_embeddings", context) != context:
                _refuse(path, field, config[field],
                        "transformers' dynamic scaling starts at max_position_embeddings "
                        f"({context}), not at original_max_position_embeddings")
            entry["original_max_position_embeddings"] = context
        try:
            found[field] = RopeScaling.from_json(entry, field)
        except RopeScalingError as error:
            raise UnsupportedConfigError(f"{path}: {error}. This library runs Llama's "
                                         f"architecture exactly and refuses other models "
                                         f"rather than run them approximately") from None
    if None not in found.values() and found["rope_scaling"] != found["rope_parameters"]:
        raise CheckpointError(f"{path} gives two rotary scalings, rope_scaling="
                              f"{config['rope_scaling']} and rope_parameters="
                              f"{config['rope_parameters']}; keep one")
    return found["rope_scaling"] or found["rope_parameters"]


def rope_theta(config: dict, path: Path) -> float:
    """The rotary base, from transformers 5's `rope_parameters` or the older top-level field."""
    top = config.get("rope_theta")
    nested = (config.get("rope_parameters") or {}).get("rope_theta")
    if top is not None and nested is not None and float(top) != float(nested):
        raise CheckpointError(f"{path} gives two rotary bases, rope_theta={top} and "
                              f"rope_parameters.rope_theta={nested}; keep one")
    value = nested if nested is not None else top
    return DEFAULT_ROPE_THETA if value is None else float(value)


def ffn_params(dim: int, n_heads: int, hidden: int) -> Tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) whose ModelArgs rule gives a feed-forward width of
    exactly `hidden`: the round values Meta's params.json use when some reproduce it (7B and
    13B: 256 and none; 70B: 4096 and 1.3), else `hidden` itself as multiple_of."""
    def width(multiple_of, multiplier):
        return ModelArgs(dim=dim, n_layers=1, n_heads=n_heads, multiple_of=multiple_of,
                         ffn_dim_multiplier=multiplier).ffn_hidden_dim

    base = int(2 * (4 * dim) / 3)  # ModelArgs' width before multiplier and rounding
    multipliers = [None] + [round(hidden / base, digits) for digits in (1, 2, 3, 4)]
    multiples = [256, 4096, 128, 64, 32, 16, 8, 4, 2, 1, 512, 1024, 2048]  # Meta's first
    for multiplier in multipliers:
        for multiple_of in multiples:
            if width(multiple_of, multiplier) == hidden:
                return multiple_of, multiplier
    # Rounding up to a multiple of `hidden` itself gives `hidden` from any width in 1..hidden.
    multiplier = None if base <= hidden else hidden / base
    if width(hidden, multiplier) == hidden:
        return hidden, multiplier
    raise CheckpointError(f"intermediate_size={hidden} cannot be expressed with "
                          f"hidden_size={dim} in Meta's params.json rule")


def model_args(config: dict, path: Path, max_seq_len: int = 2048, max_batch_size: int = 32,
               vocab_size: Optional[int] = None) -> ModelArgs:
    """ModelArgs for a supported config. `vocab_size` is the tokenizer's, checked against the
    config's (the model's vocabulary is the config's)."""
    check_supported(config, path)
    missing = [field for field in REQUIRED_FIELDS if field not in config]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: is this a transformers Llama "
                              f"config.json?")
    for field in REQUIRED_FIELDS + ("num_key_value_heads",):
        value = config.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value <= 0):
            raise CheckpointError(f"{path}: {field} must be a positive integer, got {value!r}")
    if vocab_size is not None and vocab_size != config["vocab_size"]:
        raise CheckpointError(
            f"{path} says vocab_size={config['vocab_size']} but the tokenizer has {vocab_size} "
            f"pieces: use the tokenizer.model that came with these weights (tokens added only "
            f"in tokenizer.json or added_tokens.json cannot be used by this library)")
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    try:
        multiple_of, multiplier = ffn_params(dim, heads, config["intermediate_size"])
        return ModelArgs(dim=dim, n_layers=config["num_hidden_layers"], n_heads=heads,
                         n_kv_heads=config.get("num_key_value_heads") or heads,
                         vocab_size=config["vocab_size"], multiple_of=multiple_of,
                         ffn_dim_multiplier=multiplier,
                         norm_eps=float(config.get("rms_norm_eps", DEFAULT_RMS_NORM_EPS)),
                         rope_theta=rope_theta(config, path),
                         rope_scaling=rope_scaling(config, path), max_seq_len=max_seq_len,
                         max_batch_size=max_batch_size)
    except (ValueError, TypeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {error}") from None


def hf_scaling(scaling: Optional[RopeScaling]) -> Optional[dict]:
    """config.json's rope_scaling entry, as transformers reads it (dynamic's threshold is
    max_position_embeddings, not an entry of its own)."""
    if scaling is None:
        return None
    entry = scaling.to_json()
    if scaling.rope_type == "dynamic":
        del entry["original_max_position_embeddings"]
    return entry


def hf_config(args: ModelArgs, dtype: str = "bfloat16", tie_word_embeddings: bool = False,
              max_position_embeddings: int = LLAMA2_CONTEXT, bos_token_id=BOS_ID,
              eos_token_id=EOS_ID) -> dict:
    """config.json for these shapes, as Meta's own -hf repositories write it (plus rope_theta
    and the bias flags, which transformers reads too). A dynamic scaling fixes
    max_position_embeddings (its threshold)."""
    if args.rope_scaling is not None and args.rope_scaling.rope_type == "dynamic":
        max_position_embeddings = args.rope_scaling.original_max_position_embeddings
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": hf_scaling(args.rope_scaling),
        "max_position_embeddings": max_position_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True, "torch_dtype": dtype,
    }


def generation_config(max_position_embeddings: int = LLAMA2_CONTEXT, bos_token_id=BOS_ID,
                      eos_token_id=EOS_ID, pad_token_id: Optional[int] = PAD_ID) -> dict:
    """generation_config.json with Meta's sampling defaults (also this library's)."""
    return {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "do_sample": True, "temperature": 0.6, "top_p": 0.9,
            "max_length": max_position_embeddings}


def tokenizer_configs(bos: str, eos: str, unk: str, max_length: int) -> Tuple[dict, dict]:
    """(tokenizer_config.json, special_tokens_map.json) for a SentencePiece tokenizer.model
    with Llama's conventions: BOS added, EOS not, no pad token."""
    special = {"bos_token": bos, "eos_token": eos, "unk_token": unk}
    config = {"tokenizer_class": "LlamaTokenizer", **special, "pad_token": None,
              "add_bos_token": True, "add_eos_token": False, "legacy": False,
              "clean_up_tokenization_spaces": False, "model_max_length": max_length}
    return config, special
