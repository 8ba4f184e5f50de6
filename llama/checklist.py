"""`python -m llama.checklist`: the command of llama/checkpoints/checklist.py."""

import sys

from llama.checkpoints.checklist import main

if __name__ == "__main__":
    sys.exit(main())
