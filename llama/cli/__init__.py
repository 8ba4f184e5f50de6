"""What the example scripts share: flags and "did you mean" for their arguments (flags.py),
line editing for the interactive chat (keyboard.py), and the bundled demo model (demo.py).

May import: llama.generation and below. Only scripts and commands import it.
"""
