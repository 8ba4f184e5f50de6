"""The model's products and the weights they use (Projection): one layer's weight, or the
fused q/k/v and w1/w3, whose layers share an input, so one product over the stacked rows
serves all of them. Float weights are laid out as one matrix in place (pack_weights);
quantized ones are packed together for their device's kernels (use_quantized)."""

from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from llama.layers import bf16
from llama.layers.linear import linear, pack
from llama.quantize.formats import QuantizationError
from llama.views import consecutive_rows

# Layers whose weights are used as one matrix: their products share the same input.
FUSED_WEIGHTS = {"attention": ("wq", "wk", "wv"), "feed_forward": ("w1", "w3")}


def fused_names(name: str) -> Optional[List[str]]:
    """The checkpoint names of the weights used as one matrix with `name` (e.g.
    "layers.0.attention.wk.weight": its layer's wq, wk and wv), in order; None for a weight
    used alone."""
    parts = name.split(".")  # layers.N.module.wX.field
    if len(parts) != 5 or parts[3] not in FUSED_WEIGHTS.get(parts[2], ()):
        return None
    return [".".join([*parts[:3], w, parts[4]]) for w in FUSED_WEIGHTS[parts[2]]]


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


class Projection:
    """One product of a module's input by the weights of some of its column- or row-parallel
    layers (`names`): one layer's, or several layers' stacked as one matrix of consecutive row
    blocks (q/k/v, w1/w3), so that one product serves them all. `reduce` combines the ranks'
    partial results of an unhooked product (what the layers' own calls would do).

    The layers keep their own Parameters, which are views of the matrix's rows: state_dict,
    hooks and in-place edits see them as usual, and no byte is stored twice. Whatever replaces
    a weight (`.half()`, `.to()`, `w.data = ...`, a new Parameter, `load_state_dict(assign=
    True)`, a deep copy) is noticed by the weights' addresses on the next call, and the matrix
    is laid out again from what the layers then hold.

    The product's route belongs to the weight: the float matrix itself (torch's routes), the
    matrix wrapped by `route` (e.g. float_linear.FloatKernel), or a quantized weight packed for its
    device (`packed`, linear.pack)."""

    def __init__(self, *names: str, reduce: Optional[Callable] = None):
        self.names, self.reduce = names, reduce
        self.matrix: Optional[torch.Tensor] = None
        self.addresses: Tuple[int, ...] = ()
        self.packed = None  # a quantized model's one packed weight (see set_packed)
        self.route: Optional[Callable] = None  # wraps the float matrix for its products
        self.routed, self.routed_for = None, None  # route(matrix), and the matrix it wraps

    def set_packed(self, packed) -> None:
        """Use a quantized weight packed from the layers' rows (linear.pack) instead: the
        layers then hold no weights of their own."""
        self.packed = packed

    def set_route(self, route: Optional[Callable]) -> None:
        """Wrap the float matrix with `route` for its products (None: torch's routes)."""
        self.route, self.routed, self.routed_for = route, None, None

    def __call__(self, owner: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x through the layers' weights: one product, or, when a layer has forward hooks,
        each layer called as such (its hooks fire, and it reduces over ranks itself)."""
        if self.hooked(owner):
            outs = [_call(owner._modules[name], x) for name in self.names]
            return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        out = linear(x, self.product_weight(owner))
        return self.reduce(out) if self.reduce is not None else out

    def hooked(self, owner: nn.Module) -> bool:
        """Whether one of the layers has forward hooks to run (see hooked())."""
        return any(hooked(owner._modules[name]) for name in self.names)

    def weight(self, owner: nn.Module):
        """The layers' weights as one matrix (a view when they lie that way), or the packed
        quantized weight."""
        if self.packed is not None:
            return self.packed
        if torch.compiler.is_compiling() and self.matrix is not None:  # laid out by eager calls
            return self.matrix
        params = [owner._modules[name]._parameters["weight"] for name in self.names]
        if tuple(p.data_ptr() for p in params) != self.addresses:
            self.matrix = _lay_out(params)
            self.addresses = tuple(p.data_ptr() for p in params)
        return self.matrix

    def product_weight(self, owner: nn.Module):
        """What linear() multiplies by: weight(), wrapped by the route if there is one."""
        weight = self.weight(owner)
        if self.route is None or self.packed is not None:
            return weight
        if self.routed_for is not weight:  # laid out anew (or first use): wrap it again
            self.routed, self.routed_for = self.route(weight), weight
        return self.routed

    def __deepcopy__(self, memo):
        copy = Projection(*self.names, reduce=self.reduce)  # laid out afresh on first use
        copy.packed = self.packed  # (a packed weight is never changed in place: shared)
        copy.route = self.route
        return copy


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A hooked layer called as a module; a bfloat16 weight under float32 activations is
    widened for the call (fairscale's forward is F.linear, which needs one dtype)."""
    with bf16.widened_for(module, x):
        return module(x)


def hooked(module: nn.Module) -> bool:
    """Whether calling the module would run forward hooks (its own or global ones): then the
    model calls it rather than taking a faster route around it, so the hooks fire."""
    if not (module._forward_hooks or module._forward_pre_hooks or _global_forward_hooks
            or _global_forward_pre_hooks):
        return False
    if not isinstance(module.weight, torch.Tensor):
        raise QuantizationError(
            "forward hooks on the projections of a quantized model are not supported (their "
            "weights are packed for the device's kernels, q/k/v and w1/w3 as one): hook the "
            "Attention, FeedForward or TransformerBlock modules instead")
    return True


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
    """Replace the model's weights named in `quantized` (saved formats of
    llama/quantize/formats.py) by
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

    for prefix, owner, projection in projections(model):
        packed = pack_weights_of(*(f"{prefix}{name}.weight" for name in projection.names))
        projection.set_packed(packed)
        for name in projection.names:  # a fused product's layers hold no weight of their own
            use(owner._modules[name], packed if len(projection.names) == 1 else None)
    if quantized:
        raise QuantizationError(f"weights {sorted(quantized)[:4]} cannot be quantized")


def repack(model: nn.Module, convert: Callable) -> int:
    """Replace every packed quantized weight p of the model by convert(p) (None: keep p), in
    its projection and, for a projection of one layer, in that layer. Returns how many were
    replaced."""
    replaced = 0
    for _, owner, projection in projections(model):
        new = None if projection.packed is None else convert(projection.packed)
        if new is None:
            continue
        projection.set_packed(new)
        if len(projection.names) == 1:
            owner._modules[projection.names[0]].weight = new
        replaced += 1
    return replaced


def projections(model: nn.Module) -> Iterator[Tuple[str, nn.Module, Projection]]:
    """Every Projection of the model: (its owner's name prefix, e.g. "layers.0.attention.",
    the owner, the projection)."""
    for name, module in model.named_modules():
        for value in vars(module).values():
            if isinstance(value, Projection):
                yield (f"{name}." if name else ""), module, value
