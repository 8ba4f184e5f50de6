"""Writing checkpoints in Meta's layout: consolidated.NN.pth, params.json and checklist.chk,
one shard at a time (llama.checkpoints.reshard, llama.hf.convert --to meta, llama.quantize, the
fixtures)."""

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Union

import torch

from llama.args import ModelArgs
from llama.checkpoints.meta import IGNORED_KEYS, split_dim
from llama.rope_scaling import meta_llama3


def split_state_dict(full: Dict[str, torch.Tensor], n_shards: int
                     ) -> List[Dict[str, torch.Tensor]]:
    """Cut an unsharded state dict into Meta's per-rank shards (copies, so each saves alone).
    Tensors outside the model, such as rope.freqs, are copied into every shard."""
    shards: List[Dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, tensor in full.items():
        dim = None if name in IGNORED_KEYS else split_dim(name)
        for index in range(n_shards):
            piece = tensor if dim is None else tensor.chunk(n_shards, dim=dim)[index]
            shards[index][name] = piece.clone()
    return shards


def save_checkpoint(out_dir: Path, shards: Iterable[Dict[str, torch.Tensor]],
                    params: Union[dict, Path], checklist: bool = True,
                    say: Optional[Callable[[str], None]] = None) -> None:
    """Write consolidated.NN.pth for each of `shards`, params.json (a dict, or the path of a
    params.json to copy as it is) and (unless not `checklist`: hashing 7B's files takes half
    a minute) a checklist.chk of their md5s. `shards` may build each shard as it is asked for
    (a generator expression), so that only one is held at a time; `say` hears of each file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(params, dict):
        (out_dir / "params.json").write_text(json.dumps(params))
    else:
        shutil.copyfile(params, out_dir / "params.json")
    names = ["params.json"]
    shards = iter(shards)
    while True:
        start = time.time()
        shard = next(shards, None)  # built now, if built on demand
        if shard is None:
            break
        name = f"consolidated.{len(names) - 1:02d}.pth"
        torch.save(shard, out_dir / name)
        del shard
        names.append(name)
        if say is not None:
            say(f"wrote {out_dir / name} ({time.time() - start:.1f} s)")
    if checklist:
        write_checklist(out_dir, names)


def write_checklist(out_dir: Path, names: List[str]) -> None:
    from llama.checkpoints.checklist import md5_file

    lines = [f"{md5_file(str(Path(out_dir) / name))}  {name}\n" for name in sorted(names)]
    (Path(out_dir) / "checklist.chk").write_text("".join(lines))


def params_json(args: ModelArgs) -> dict:
    """params.json as Meta writes it: the shape, with vocab_size -1 (Llama 2) or the real one
    (Llama 3, recognised by its rotary base or scaling); use_scaled_rope for Meta's llama3
    scaling, and our "rope_scaling" entry for any scaling that flag alone does not say."""
    llama3 = args.rope_theta == 500000.0 or args.use_scaled_rope
    params = {"dim": args.dim, "multiple_of": args.multiple_of, "n_heads": args.n_heads,
              "n_layers": args.n_layers, "norm_eps": args.norm_eps,
              "vocab_size": args.vocab_size if llama3 else -1}
    if args.n_kv_heads != args.n_heads:
        params["n_kv_heads"] = args.n_kv_heads
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    if args.rope_theta != 10000.0:
        params["rope_theta"] = args.rope_theta
    if args.use_scaled_rope:
        params["use_scaled_rope"] = True
    meta = meta_llama3(args.dim, args.n_layers, args.n_heads, args.n_kv_heads)
    if args.rope_scaling is not None and args.rope_scaling != meta:
        params["rope_scaling"] = args.rope_scaling.to_json()
    return params
