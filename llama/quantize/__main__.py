"""`python -m llama.quantize`."""

import sys

from llama.quantize.cli import main

sys.exit(main())
