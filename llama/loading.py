"""Loading a checkpoint directory onto this process's model-parallel rank: the one path from
files on disk to a `Transformer`, for Meta's layout and Hugging Face's (their rules live in
llama/checkpoints/meta.py and llama/hf/format.py)."""

import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from fairscale.nn.model_parallel.initialize import get_model_parallel_group

from llama.checkpoints import host_memory, memory_fit
from llama.checkpoints import meta as checkpoint
from llama.engine.distributed import (
    choose_device,
    choose_dtype,
    init_process_groups,
    is_main_process,
)
from llama.engine.validation import (
    ArgumentFileNotFoundError,
    ArgumentValueError,
    LlamaWarning,
    check_activations,
    check_arguments,
    check_ckpt_dir,
    check_group_size,
    check_int,
    check_kv_cache_dtype,
    check_path,
    check_quantize,
    context_warning,
)
from llama.hf import format as hf_format
from llama.layers import bf16
from llama.layers.w8a8 import check_activations_route, slow_here
from llama.model import KVCache, Transformer
from llama.quantize.formats import DEFAULT_GROUP_SIZE


def log(message: str) -> None:
    """Progress for people, on stderr of rank 0, so stdout stays clean for scripts."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def check_build_arguments(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size,
                          model_parallel_size, seed, device, dtype, verify, verbose) -> str:
    """Everything Llama.build can check before loading: the values, whether CUDA is there if
    asked for, the checkpoint directory, then the tokenizer file (ArgumentError or
    CheckpointError); warns when max_seq_len goes past the trained context. Returns the
    tokenizer file: `tokenizer_path`, or when it is None the directory's tokenizer.model."""
    check_path("ckpt_dir", ckpt_dir)
    if tokenizer_path is not None:
        check_path("tokenizer_path", tokenizer_path)
    check_arguments(dict(max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                         model_parallel_size=model_parallel_size, seed=seed, device=device,
                         dtype=dtype, verify=verify, verbose=verbose))
    choose_device(device)
    check_ckpt_dir(ckpt_dir)
    if hf_format.is_hf_checkpoint(Path(ckpt_dir)):
        source = hf_format.HFCheckpoint(Path(ckpt_dir))  # config refusals, weight files
        # max_seq_len too: a dynamic rope scaling refuses one past its context
        shape = source.model_args(max_seq_len)
        rope_theta = shape.rope_theta
        scaling = shape.rope_scaling.rope_type if shape.rope_scaling is not None else None
    else:
        checkpoint.find_shards(Path(ckpt_dir))
        params = checkpoint.read_params(Path(ckpt_dir))
        rope_theta = params.get("rope_theta", 10000.0)
        entry = params.get("rope_scaling")  # ours, in a converted Hub model's params.json
        scaling = "llama3" if params.get("use_scaled_rope") is True else \
            entry.get("rope_type", entry.get("type")) if isinstance(entry, dict) else None
    if tokenizer_path is None:
        tokenizer_path = os.path.join(ckpt_dir, "tokenizer.model")
        hub_copy = os.path.join(ckpt_dir, "original", "tokenizer.model")  # Hub's Llama 3.x
        if not os.path.isfile(tokenizer_path) and os.path.isfile(hub_copy):
            tokenizer_path = hub_copy
        if not os.path.isfile(tokenizer_path):
            only_json = os.path.isfile(os.path.join(ckpt_dir, "tokenizer.json"))
            raise ArgumentFileNotFoundError(
                "tokenizer_path", f"tokenizer_path was not given and {tokenizer_path!r} does not "
                                  f"exist: pass tokenizer_path (Meta's downloads keep "
                                  f"tokenizer.model beside the model directories)"
                                  + ("; this directory has only tokenizer.json, and this library "
                                     "reads tokenizer.model files (a Llama 3 Hub repository "
                                     "keeps its own as original/tokenizer.model)"
                                     if only_json else ""))
    if not os.path.exists(tokenizer_path):
        raise ArgumentFileNotFoundError(
            "tokenizer_path", f"tokenizer_path {os.fspath(tokenizer_path)!r} does not exist: it "
                              f"should be the tokenizer.model downloaded with the weights")
    if os.path.isdir(tokenizer_path):
        raise ArgumentValueError(
            "tokenizer_path", f"tokenizer_path {os.fspath(tokenizer_path)!r} is a directory: it "
                              f"should be the tokenizer.model file downloaded with the weights")
    warning = context_warning(max_seq_len, rope_theta, scaling)
    if warning:
        warnings.warn(warning, LlamaWarning, stacklevel=3)  # at the caller of Llama.build
    return tokenizer_path


def check_quantize_arguments(quantize: Optional[str], group_size: Optional[int]) -> None:
    """quantize is None, "int8" or "int4"; group_size (int4 only) one of 32, 64, 128."""
    check_quantize(quantize)
    check_group_size(group_size)
    if group_size is not None and quantize != "int4":
        raise ArgumentValueError("group_size", f"group_size applies to quantize='int4' only "
                                               f"(quantize={quantize!r})")


def check_quantization(args, mode: str, group_size: int, world_size: int, device,
                       saved: bool = False) -> None:
    """Before any weight is read: int4 needs a kernel on `device`, and each rank's share of
    every quantized weight's input columns must be a whole number of groups (`saved`: the
    checkpoint's own groups, which are not requantized)."""
    from llama.layers.linear import check_int4_device

    if mode != "int4":
        return
    check_int4_device(device)
    checkpoint.check_group_split(args, group_size, world_size, saved=saved)


def check_saved_quantization(saved, quantize: Optional[str], group_size: Optional[int],
                             ckpt_dir: Path) -> None:
    """A quantized checkpoint loads as it was saved: quantize (and group_size) may repeat the
    file's, not ask for another (weights are never quantized twice)."""
    requantize = "python -m llama.quantize FLOAT_CHECKPOINT DST --mode"
    if quantize is not None and quantize != saved.mode:
        raise ArgumentValueError(
            "quantize", f"quantize={quantize!r}, but {ckpt_dir} holds {saved} weights already "
                        f"(params.json's \"quantization\"), which are not quantized again: "
                        f"pass quantize=None (or {saved.mode!r}) to load them as they are, or "
                        f"quantize the float checkpoint: {requantize} {quantize}")
    if group_size is not None and group_size != saved.group_size:
        raise ArgumentValueError(
            "group_size", f"group_size={group_size}, but {ckpt_dir} holds {saved} weights "
                          f"(params.json's \"quantization\"): leave group_size out to load "
                          f"them, or quantize the float checkpoint: {requantize} int4 "
                          f"--group_size {group_size}")


@dataclass(frozen=True)
class LoadOptions:
    """How load_model places and stores a checkpoint (Llama.build's arguments of the same
    names)."""
    model_parallel_size: Optional[int] = None
    seed: int = 1
    device: Optional[str] = None
    dtype: Optional[torch.dtype] = None
    verify: bool = False
    verbose: bool = True
    quantize: Optional[str] = None
    group_size: Optional[int] = None
    reserve_memory: int = 0
    kv_cache_dtype: Optional[torch.dtype] = None  # None: the activations' dtype
    activations: Optional[str] = None  # "int8": quantized weights' products round them to int8


def check_options(options: LoadOptions) -> LoadOptions:
    """`options` checked (ArgumentError for the first bad value), kv_cache_dtype as a torch
    dtype: Llama.build checks them before it reads the tokenizer, load_model for its callers."""
    check_quantize_arguments(options.quantize, options.group_size)
    check_int("reserve_memory", options.reserve_memory, 0)
    check_activations(options.activations)
    return replace(options, kv_cache_dtype=check_kv_cache_dtype(options.kv_cache_dtype))


def load_model(ckpt_dir: str, vocab_size: int, max_seq_len: int, max_batch_size: int,
               options: LoadOptions = LoadOptions()) -> Transformer:
    """The Transformer of a checkpoint directory, in Meta's layout or Hugging Face's
    (config.json), for this process's model-parallel rank (see Llama.build, which adds the
    tokenizer). `vocab_size` is the tokenizer's. With `options.quantize` ("int8" or "int4",
    int4 in groups of `group_size` columns), the projections and the output matrix are
    quantized tensor by tensor as they are read. `options.kv_cache_dtype` is the dtype the
    model's caches keep keys and values in (Transformer.set_kv_cache_dtype; None: the
    activations'), counted in the memory check."""
    options = check_options(options)
    model_parallel_size, seed, verify = options.model_parallel_size, options.seed, options.verify
    device, dtype, verbose = options.device, options.dtype, options.verbose
    quantize, group_size = options.quantize, options.group_size
    check_int("max_seq_len", max_seq_len, 1)
    check_int("max_batch_size", max_batch_size, 1)
    kv_cache_dtype = options.kv_cache_dtype
    start_time = time.time()
    say = log if verbose else (lambda message: None)
    device = choose_device(device)
    keep_bf16 = bf16.stores_bf16(device, dtype)  # the checkpoint's bfloat16 matrices as they are
    dtype = choose_dtype(device, dtype)
    ckpt_dir = Path(ckpt_dir)
    hub = hf_format.is_hf_checkpoint(ckpt_dir)
    if hub:
        source = hf_format.HFCheckpoint(ckpt_dir)
        args = source.model_args(max_seq_len, max_batch_size, vocab_size)
        files = len(set(source.weight_map.values()))
        files = f"{files} Hugging Face file{'s' if files > 1 else ''}"
    else:
        shard_paths = checkpoint.find_shards(ckpt_dir)
        args = checkpoint.model_args(ckpt_dir, max_seq_len, max_batch_size, vocab_size)
        files = f"{len(shard_paths)} shard{'s' if len(shard_paths) > 1 else ''}"
    saved = None if hub else checkpoint.read_quantization(ckpt_dir)
    if saved is not None:
        check_saved_quantization(saved, quantize, group_size, ckpt_dir)
        quantize, group_size = saved.mode, saved.group_size
    if options.activations is not None:
        check_activations_route(quantize, device)
        slow = slow_here()
        if slow:
            warnings.warn(slow, LlamaWarning, stacklevel=3)  # at the caller of Llama.build
    rank, world_size = init_process_groups(device, model_parallel_size, announce=verbose)
    checkpoint.check_world_size(args, world_size)
    group_size = group_size or DEFAULT_GROUP_SIZE
    if quantize is not None:
        check_quantization(args, quantize, group_size, world_size, device, saved is not None)
    torch.manual_seed(seed)
    # Opened (memory-mapped), not read: what the files hold decides what the model will need.
    shards = None if hub else _open_shards(shard_paths, args, rank, world_size, say, saved)
    stored = (source.stored_dtype("tok_embeddings.weight") if hub else
              next(iter(shards.values()))["tok_embeddings.weight"].dtype)
    keep_bf16 = keep_bf16 and stored == torch.bfloat16
    memory_fit.check_fits(args, world_size, quantize, group_size,
                          torch.bfloat16 if keep_bf16 else dtype, dtype, device,
                          saved=saved is not None, bf16_checkpoint=stored == torch.bfloat16,
                          reserved=options.reserve_memory, cache_dtype=kv_cache_dtype,
                          activations=options.activations)
    if verify:
        say(f"Verifying {ckpt_dir} against checklist.chk ...")
        checkpoint.verify_files(ckpt_dir)

    convert = None
    if quantize is not None and saved is None:
        convert = quantizer(quantize, group_size, world_size, device, args)
    if keep_bf16:
        convert = bf16.keeping_bf16(device, convert)
    if hub:
        # Copies leave the memory-mapped files' pages behind; they are dropped as we go.
        state, is_mapped = source.rank_state_dict(args, rank, world_size, dtype, device,
                                                  convert=convert)
        del source
    else:
        state, is_mapped = _meta_rank_state(shards, len(shard_paths), args, rank, world_size,
                                            dtype, device, convert, saved)
        del shards
    weight_bytes = sum(_nbytes(t) for t in state.values())
    _report_memory(args, weight_bytes, device, kv_cache_dtype or dtype, world_size, say,
                   quantize, state["tok_embeddings.weight"].dtype, state["norm.weight"].dtype)

    def after_copy(tensor):
        # the original of a weight that fusing or packing copied: its file pages are not
        # needed again; what the copies before it freed on the heap goes back to the OS
        if is_mapped(tensor):
            host_memory.release_file_pages(tensor)
        host_memory.trim_heap()  # packing a saved int4 weight unpacks it to a temporary too

    model = Transformer.from_state_dict(args, state, after_copy=after_copy)
    del state
    model.set_kv_cache_dtype(kv_cache_dtype)
    if options.activations is not None:
        model.use_int8_activations()
        host_memory.trim_heap()  # the old layouts' holes
    say(f"Loaded in {time.time() - start_time:.2f} seconds "
        f"({world_size} process{'es' if world_size > 1 else ''}, {files}, {device.type}, "
        f"{_name(dtype)}"
        f"{'' if quantize is None else ', ' + quantize + ' weights'}"
        f"{'' if options.activations is None else ', int8 activations (blocks of 32)'}"
        f"{', bfloat16 ' + ('embedding' if quantize else 'weights') if keep_bf16 else ''}"
        f"{'' if saved is None else ' as saved'}"
        f"{'' if kv_cache_dtype is None else ', ' + _name(kv_cache_dtype) + ' KV cache'})")
    return model


def quantizer(mode: str, group_size: int, world_size: int, device, args):
    """convert(name, tensor) for rank_state_dict: the projections and the output matrix in
    the saved format of `mode`, everything else as it is. A row-parallel weight (wo, w2) is
    split by columns across ranks, so each row's int8 scale is taken over the whole row (the
    ranks' row maxima all-reduced): every rank then holds the scales one process would.
    The weights used as one matrix (q/k/v, w1/w3) are quantized into consecutive rows of one
    buffer, so the model uses them as they are (no copy, and no freed pieces left between
    the weights being kept)."""
    from llama.layers.fused import fused_names
    from llama.quantize.formats import is_quantized, quantize, row_absmax
    from llama.quantize.shards import empty_like_rows

    shapes = checkpoint.full_shapes(args)
    outs = {}  # name -> the rows of its fused matrix to quantize into

    def out_for(name: str):
        group = fused_names(name)
        if group is None:
            return None
        if name not in outs:
            rows = [checkpoint.shard_shape(n, shapes[n], world_size) for n in group]
            outs.update(zip(group, empty_like_rows(mode, group_size, rows, device)))
        return outs.pop(name)

    def convert(name: str, tensor: torch.Tensor):
        if not is_quantized(name):
            return tensor
        # From the file's values (quantize reads a block of rows at a time: no float copy of
        # the whole tensor), on the device that will compute with it.
        tensor = tensor.to(device)
        absmax = None
        if mode == "int8" and world_size > 1 and checkpoint.split_dim(name) == 1:
            absmax = row_absmax(tensor)
            torch.distributed.all_reduce(absmax, op=torch.distributed.ReduceOp.MAX,
                                         group=get_model_parallel_group())
        quantized = quantize(tensor, mode, group_size, absmax, name, out=out_for(name))
        host_memory.trim_heap()  # the temporaries' pages (see trim_heap)
        return quantized

    return convert


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _nbytes(weight) -> int:
    return (weight.numel() * weight.element_size() if isinstance(weight, torch.Tensor)
            else weight.nbytes)


def _open_shards(shard_paths, args, rank: int, world_size: int, say, quantization=None):
    """The shards this rank needs, memory-mapped and checked (no weight read yet)."""
    shards = {}
    for index in checkpoint.shards_for_rank(len(shard_paths), world_size, rank):
        shard_start = time.time()
        shards[index] = checkpoint.load_shard(shard_paths[index])
        checkpoint.check_shard(shard_paths[index], shards[index], args, len(shard_paths),
                               quantization)
        say(f"Opened shard {shard_paths[index].name} ({index + 1}/{len(shard_paths)}) in "
            f"{time.time() - shard_start:.2f} s")
    return shards


def _meta_rank_state(shards, n_shards: int, args, rank: int, world_size: int, dtype, device,
                     convert=None, quantization=None):
    """This rank's tensors from Meta's opened shards, and whether a tensor lies in a mapped
    shard. Of a quantized checkpoint (`quantization`, params.json's entry), the quantized
    weights come back in their saved format, as `convert` makes them while quantizing at
    load."""
    from llama.quantize.formats import gather_saved

    # Copies leave the memory-mapped files' pages behind; drop those as we go.
    state = checkpoint.rank_state_dict(shards, n_shards, args, rank, world_size,
                                       dtype, device, release_copied=True, convert=convert,
                                       quantization=quantization)
    if quantization is not None:
        state = gather_saved(state)
    mapped = {t.untyped_storage().data_ptr() for shard in shards.values()
              for t in shard.values()}
    return state, lambda tensor: tensor.untyped_storage().data_ptr() in mapped


def _report_memory(args, weight_bytes: int, device: torch.device, cache_dtype, world_size: int,
                   say, quantize: Optional[str], embedding: torch.dtype, norms: torch.dtype):
    """The weights' bytes as loaded (`embedding`, `norms`: the dtypes they are held in) and the
    KV cache's most."""
    cache_bytes = (KVCache.bytes_per_token(args, cache_dtype, world_size) * args.max_batch_size
                   * args.max_seq_len)
    gib = 1024 ** 3
    kept = (f"{_name(embedding)} embedding and norms" if embedding == norms else
            f"{_name(embedding)} embedding, {_name(norms)} norms")
    kinds = "" if quantize is None else f" ({quantize} projections and output, {kept})"
    say(f"Memory on this rank: weights {weight_bytes / gib:.2f} GiB{kinds}; KV cache at most "
        f"{cache_bytes / gib:.2f} GiB {_name(cache_dtype)} "
        f"(max_batch_size {args.max_batch_size} x max_seq_len "
        f"{args.max_seq_len}), allocated per call for the tokens it needs")
