"""`python -m llama.checklist`: the command of llama/checkpoints/checklist.py, its mistakes
said as the other tools say them."""

import sys

from llama.checkpoints.checklist import main
from llama.cli.flags import ArgumentParser

if __name__ == "__main__":
    sys.exit(main(parser_class=ArgumentParser, prog="python -m llama.checklist"))
