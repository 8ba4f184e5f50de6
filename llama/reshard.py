"""`python -m llama.reshard`: the command of llama/checkpoints/reshard.py."""

import sys

from llama.checkpoints.reshard import main

if __name__ == "__main__":
    sys.exit(main())
