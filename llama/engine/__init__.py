"""The decode engine that the library's calls and the server share: sequences in cache slots,
prefill and decode steps (core.py), sampling (sampling.py), text tracking and stop strings
(text.py), results and finish reasons (results.py), the same decisions on every rank
(distributed.py), and argument checks (validation.py).

May import: llama.model and llama.layers (to build step inputs). Never llama.generation, the
server or the CLI.
"""
