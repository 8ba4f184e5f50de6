"""The model's shape and limits: Meta's `ModelArgs` (params.json plus the run's limits),
validated once."""

from dataclasses import dataclass
from typing import Optional

from llama.rope_scaling import RopeScaling, RopeScalingError, check_context, meta_llama3


@dataclass
class ModelArgs:
    # Meta's fields, in Meta's order (code builds ModelArgs positionally); ours after them.
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # -1 in Meta's params.json: taken from the tokenizer
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    max_batch_size: int = 32
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # Llama 3.1+: Meta's "llama3" frequency scaling
    # Ours: the scaling itself (llama/rope_scaling.py): what use_scaled_rope means for this
    # shape, or a Hub config's `rope_scaling` (a dict, as in JSON, is read into one).
    rope_scaling: Optional[RopeScaling] = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if not isinstance(self.use_scaled_rope, bool):
            raise ValueError(f"ModelArgs.use_scaled_rope must be true or false, got "
                             f"{self.use_scaled_rope!r}")
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling.from_json(self.rope_scaling)
        elif self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"ModelArgs.rope_scaling must be a RopeScaling, a dict or None, "
                             f"got {self.rope_scaling!r}")
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of",
                     "max_batch_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(
                f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(
                f"head_dim = dim / n_heads = {self.dim // self.n_heads} must be even for rotary "
                f"embeddings")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        self._settle_rope_scaling()

    def _settle_rope_scaling(self) -> None:
        """use_scaled_rope and rope_scaling say the same thing once built: Meta's flag alone
        gets Meta's numbers for this shape; a llama3 scaling sets the flag."""
        scaling = self.rope_scaling
        if self.use_scaled_rope and scaling is None:
            self.rope_scaling = meta_llama3(self.dim, self.n_layers, self.n_heads,
                                            self.n_kv_heads)
        elif self.use_scaled_rope and scaling.rope_type != "llama3":
            raise RopeScalingError(f"use_scaled_rope (Meta's llama3 scaling) contradicts "
                                   f"rope_scaling {scaling.rope_type!r}; keep one")
        elif scaling is not None and scaling.rope_type == "llama3":
            self.use_scaled_rope = True
        check_context(self.rope_scaling, self.max_seq_len)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, 4 * self.dim, self.multiple_of, self.ffn_dim_multiplier)


def ffn_hidden_dim(dim: int, hidden_dim: int, multiple_of: int,
                   ffn_dim_multiplier: Optional[float]) -> int:
    """The reference's rule: 2/3 of hidden_dim (4 * dim), optionally scaled, rounded up to a
    multiple of multiple_of."""
    hidden = int(2 * hidden_dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def count_parameters(params: ModelArgs) -> int:
    """Parameters of the full (unsharded) model, without building it."""
    hd, dim = params.head_dim, params.dim
    attention = dim * params.n_heads * hd * 2 + dim * params.n_kv_heads * hd * 2
    ffn = 3 * dim * params.ffn_hidden_dim
    per_layer = attention + ffn + 2 * dim
    return params.n_layers * per_layer + 2 * params.vocab_size * dim + dim
