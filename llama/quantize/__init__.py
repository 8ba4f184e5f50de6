"""Weight quantization: the int8/int4 formats (formats.py, re-exported here), quantized weights
sliced and joined across shards and fused products (shards.py), and the command that writes a
quantized checkpoint (cli.py; `python -m llama.quantize SRC DST --mode int8|int4`).

formats.py and shards.py import nothing above them; cli.py uses llama.checkpoints.
"""

from llama.quantize.formats import (  # noqa: F401
    DEFAULT_GROUP_SIZE,
    GROUP_SIZES,
    MODES,
    SAVED_DTYPES,
    Int4Weight,
    Int8Weight,
    Quantization,
    QuantizationError,
    QuantizedWeight,
    check_group_size,
    from_tensors,
    gather_saved,
    group_sizes_for,
    is_quantized,
    quantize,
    quantize_int4,
    quantize_int8,
    row_absmax,
    saved_key,
    split_field,
)
