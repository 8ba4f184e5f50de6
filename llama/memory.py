"""`python -m llama.memory`: the command of llama/checkpoints/memory.py."""

import sys

from llama.checkpoints.memory import main

if __name__ == "__main__":
    sys.exit(main())
