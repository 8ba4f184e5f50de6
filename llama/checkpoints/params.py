"""params.json: a checkpoint's hyper-parameters read and checked (Meta's fields for Llama 2 and
3.x, refusals by name of what this library does not run), a quantized checkpoint's
"quantization" entry, and the ModelArgs they make."""

import json
from pathlib import Path
from typing import Optional

from llama.args import ModelArgs
from llama.quantize.formats import Quantization, QuantizationError

_PARAMS_FIELDS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                  "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope",
                  "rope_scaling"}  # rope_scaling: ours, for what use_scaled_rope cannot say
# Fields Meta's Llama 3 ModelArgs knows that describe models this library does not run.
_REFUSED_FIELDS = {
    "vision_chunk_size": "Llama 3.2 Vision (11B, 90B) adds an image encoder and cross-attention "
                         "layers; only the text models run here",
    "vision_max_num_chunks": "Llama 3.2 Vision models are not supported (text models only)",
    "vision_num_cross_attention_layers": "Llama 3.2 Vision models are not supported (text "
                                         "models only)",
    "vision_model": "Llama 3.2 Vision models are not supported (text models only)",
    "quantization_args": "Meta's quantized Llama 3.2 releases (QLoRA / SpinQuant int4 with "
                         "int8 activations) use their own tensor format; load the float "
                         "checkpoint and pass quantize=, or use python -m llama.quantize",
    "lora_args": "Meta's QLoRA checkpoints carry adapter tensors this model does not have; use "
                 "the float checkpoint",
    "max_seq_len": "the context length is a Llama.build argument (max_seq_len), not a "
                   "checkpoint field; remove it from params.json",
    "max_batch_size": "the batch size is a Llama.build argument (max_batch_size), not a "
                      "checkpoint field; remove it from params.json",
}
# Their values in Meta's ModelArgs for a text model: harmless when a params.json spells them.
_TEXT_DEFAULTS = {"vision_chunk_size": -1, "vision_max_num_chunks": 4,
                  "vision_num_cross_attention_layers": -1, "quantization_args": None,
                  "lora_args": None}
QUANTIZATION_FIELD = "quantization"  # params.json's entry of a quantized checkpoint


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be used, with what to do about it."""


def _read_params_json(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a checkpoint directory holds params.json and "
                              f"consolidated.NN.pth files (see download.sh)")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); re-download it") from None
    if not isinstance(params, dict):
        raise CheckpointError(f"{path} must hold a JSON object of model hyper-parameters")
    for field in sorted(set(params) & set(_REFUSED_FIELDS)):
        if field in _TEXT_DEFAULTS and params[field] == _TEXT_DEFAULTS[field]:
            continue
        raise CheckpointError(f"{path} has {field}={params[field]!r}: {_REFUSED_FIELDS[field]}")
    params = {k: v for k, v in params.items()
              if not (k in _TEXT_DEFAULTS and v == _TEXT_DEFAULTS[k])}
    unknown = sorted(set(params) - _PARAMS_FIELDS - {QUANTIZATION_FIELD})
    if unknown:
        raise CheckpointError(f"{path} has fields this library does not know: {unknown}; "
                              f"known fields are {sorted(_PARAMS_FIELDS | {QUANTIZATION_FIELD})}")
    return params


def read_params(ckpt_dir: Path) -> dict:
    """params.json's model hyper-parameters (ModelArgs fields); a quantized checkpoint's
    "quantization" entry is read by read_quantization."""
    params = _read_params_json(ckpt_dir)
    params.pop(QUANTIZATION_FIELD, None)
    return params


def read_quantization(ckpt_dir: Path) -> Optional[Quantization]:
    """params.json's "quantization" entry (None for a float checkpoint)."""
    entry = _read_params_json(ckpt_dir).get(QUANTIZATION_FIELD)
    if entry is None:
        return None
    path = Path(ckpt_dir) / "params.json"
    if not isinstance(entry, dict) or set(entry) - {"mode", "group_size"}:
        raise CheckpointError(f'{path}: "quantization" must be {{"mode": "int8"}} or '
                              f'{{"mode": "int4", "group_size": 32|64|128}}, got {entry!r}')
    try:
        return Quantization(entry.get("mode"), entry.get("group_size"))
    except QuantizationError as error:
        raise CheckpointError(f'{path}: "quantization": {error}') from None


def model_args(ckpt_dir: Path, max_seq_len: int, max_batch_size: int,
               vocab_size: int) -> ModelArgs:
    """ModelArgs from params.json, with the vocabulary size taken from the tokenizer as the
    reference does (params.json says -1)."""
    params = read_params(ckpt_dir)
    declared = params.pop("vocab_size", -1)
    if declared not in (-1, None) and declared != vocab_size:
        raise CheckpointError(
            f"params.json in {ckpt_dir} says vocab_size={declared} but the tokenizer has "
            f"{vocab_size} pieces: use the tokenizer.model that came with these weights")
    try:
        return ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                         vocab_size=vocab_size, **params)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{Path(ckpt_dir) / 'params.json'}: {error}") from None
