"""Weights used as one matrix: the fused q/k/v and w1/w3 products. Their layers share an
input, so one product over the stacked rows serves all of them. Float weights are laid out as
one matrix in place (pack_weights); quantized ones are packed together for their device's
kernels (use_quantized)."""

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from llama.linear import pack
from llama.quantize import QuantizationError
from llama.views import consecutive_rows


# Layers whose weights are used as one matrix: their products share the same input.
FUSED_WEIGHTS = {"attention": ("wq", "wk", "wv"), "feed_forward": ("w1", "w3")}


def pack_weights(state: Dict[str, torch.Tensor], n_layers: int, after_copy=None) -> None:
    """Lay each layer's wq/wk/wv and w1/w3 out as consecutive row blocks of one matrix, in
    place, one group at a time (so loading needs no second copy of the weights). Entries stay
    views under Meta's names. `after_copy(tensor)` is called on each original once it has
    been copied."""
    for layer in range(n_layers):
        for module, names in FUSED_WEIGHTS.items():
            keys = [f"layers.{layer}.{module}.{name}.weight" for name in names]
            if not all(isinstance(state[key], torch.Tensor) for key in keys):
                continue  # quantized: packed together by Transformer.from_state_dict
            originals = [state.pop(key) for key in keys]
            pieces = torch.cat(originals, dim=0).split([w.shape[0] for w in originals], dim=0)
            state.update(zip(keys, pieces))
            for original in originals if after_copy else ():
                after_copy(original)


class FusedRows:
    """The weights of some column-parallel layers of a module (`names`) as one matrix of
    consecutive row blocks, so that one product serves them all.

    The layers keep their own Parameters, which are views of the matrix's rows: state_dict,
    hooks and in-place edits see them as usual, and no byte is stored twice. Whatever replaces
    a weight (`.half()`, `.to()`, `w.data = ...`, a new Parameter, `load_state_dict(assign=
    True)`, a deep copy) is noticed by the weights' addresses on the next call, and the matrix
    is laid out again from what the layers then hold."""

    def __init__(self, *names: str):
        self.names = names
        self.matrix: Optional[torch.Tensor] = None
        self.addresses: Tuple[int, ...] = ()
        self.packed = None  # a quantized model's one packed weight (see set_packed)

    def set_packed(self, packed) -> None:
        """Use a quantized weight packed from the layers' rows (linear.pack) instead: the
        layers then hold no weights of their own."""
        self.packed = packed

    def weight(self, owner: nn.Module):
        if self.packed is not None:
            return self.packed
        if torch.compiler.is_compiling() and self.matrix is not None:  # laid out by eager calls
            return self.matrix
        params = [owner._modules[name]._parameters["weight"] for name in self.names]
        if tuple(p.data_ptr() for p in params) != self.addresses:
            self.matrix = _lay_out(params)
            self.addresses = tuple(p.data_ptr() for p in params)
        return self.matrix

    def __deepcopy__(self, memo):
        copy = FusedRows(*self.names)  # a copy's layers are laid out afresh on first use
        copy.packed = self.packed  # (a packed weight is never changed in place: shared)
        return copy


def _lay_out(params: List[nn.Parameter]) -> torch.Tensor:
    """One matrix whose row blocks are `params`, each Parameter made a view of its rows (the
    same Parameter objects, so optimisers and hooks keep them). No copy when they already lie
    that way (pack_weights does that while loading)."""
    weights = [p.detach() for p in params]
    matrix = consecutive_rows(weights)
    if matrix is not None:
        return matrix
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, as parameters are
        matrix = torch.cat(weights, dim=0)
        row = 0
        for param in params:
            rows = param.shape[0]
            param.data = matrix[row: row + rows]
            row += rows
    return matrix


def use_quantized(model: nn.Module, quantized: dict, like: torch.Tensor,
                  after_copy=None) -> None:
    """Replace the model's weights named in `quantized` (saved formats of llama/quantize.py) by
    weights packed for `like`'s device, with activations of its dtype: wq|wk|wv and w1|w3
    each packed as one, whose layers then hold no weight of their own. `after_copy`: see
    pack_weights (here: a saved weight's tensors that packing copied)."""
    device, dtype = like.device, like.dtype

    def pack_weights_of(*names):
        pieces = [quantized.pop(name) for name in names]
        packed = pack(pieces if len(pieces) > 1 else pieces[0], device, dtype)
        kept = {t.untyped_storage().data_ptr() for t in vars(packed).values()
                if isinstance(t, torch.Tensor)}  # what packing used as it was
        for piece in pieces if after_copy else ():
            for tensor in piece.tensors().values():
                if tensor.untyped_storage().data_ptr() not in kept:
                    after_copy(tensor)
        return packed

    def use(module: nn.Module, packed) -> None:
        del module.weight  # the Parameter: its layer now computes with `packed`
        module.weight = packed

    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        for owner, fused, names in ((layer.attention, layer.attention._qkv, "wq wk wv"),
                                    (layer.feed_forward, layer.feed_forward._w13, "w1 w3")):
            module_name = "attention" if owner is layer.attention else "feed_forward"
            fused.set_packed(pack_weights_of(*(f"{p}{module_name}.{n}.weight"
                                               for n in names.split())))
            for n in names.split():
                use(owner._modules[n], None)
        use(layer.attention.wo, pack_weights_of(f"{p}attention.wo.weight"))
        use(layer.feed_forward.w2, pack_weights_of(f"{p}feed_forward.w2.weight"))
    use(model.output, pack_weights_of("output.weight"))
    if quantized:
        raise QuantizationError(f"weights {sorted(quantized)[:4]} cannot be quantized")
