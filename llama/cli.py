"""What the example scripts share: finding the weights, and process-level setup that a library
must not do (silencing the other ranks' stdout)."""

import os
import sys
from typing import Optional, Tuple


def resolve_model_paths(ckpt_dir: Optional[str], tokenizer_path: Optional[str]
                        ) -> Tuple[str, str]:
    """The given paths, or the bundled demo model when no --ckpt_dir is given (said on
    stderr, so stdout stays the generations)."""
    if ckpt_dir is None:
        from llama.demo import DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH, demo_model_message

        if is_rank0():
            print(demo_model_message(), file=sys.stderr)
        return DEMO_CKPT_DIR, tokenizer_path or DEMO_TOKENIZER_PATH
    if tokenizer_path is None:
        candidates = [os.path.join(ckpt_dir, "tokenizer.model"),
                      os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), "tokenizer.model")]
        found = [path for path in candidates if os.path.isfile(path)]
        if not found:
            raise SystemExit(f"--tokenizer_path not given and no tokenizer.model found in "
                             f"{ckpt_dir} or its parent: pass --tokenizer_path")
        tokenizer_path = found[0]
    return ckpt_dir, tokenizer_path


def is_rank0() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def quiet_other_ranks() -> None:
    """Under torchrun every rank runs the script; only rank 0 should print."""
    if not is_rank0():
        sys.stdout = open(os.devnull, "w")
