"""`python -m llama.server`."""

import sys

from llama.server.app import main

sys.exit(main())
