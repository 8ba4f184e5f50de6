"""`python -m llama.convert`: the command of llama/hf/convert.py."""

import sys

from llama.hf.convert import main

if __name__ == "__main__":
    sys.exit(main())
