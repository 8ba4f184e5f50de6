"""Checkpoints on disk and onto a rank: Meta's layout (meta.py: params.json, shards, the plan
of which rank reads what), loading (loading.py: load_model, the memory report), saving and
resharding (saving.py, reshard.py), md5 checklists (checklist.py), memory estimates
(memory.py, host_memory.py) and random checkpoints for tests and benchmarks (fixtures.py).

May import: llama.args, llama.model, llama.quantize, llama.hf (the Hub layout as a source),
llama.engine.validation and .distributed. Never the engine's generation, serving or CLI.
"""
