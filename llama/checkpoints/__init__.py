"""Checkpoints on disk and onto a rank.

- params.py: params.json read and checked (Llama 2 and 3.x fields), ModelArgs from it;
- meta.py: Meta's layout (shards, which dimension each tensor is split on, each rank's
  slices, strict checks);
- loading.py: load_model, a directory onto this rank (memory report, lean copies);
- memory.py, memory_fit.py, host_memory.py: what a model holds per rank, the check before
  loading that it fits, pages handed back while loading;
- saving.py, reshard.py: writing Meta's layout one shard at a time, for any shard count;
- checklist.py: md5 checklists (also a standalone script for download.sh);
- fixtures.py: random checkpoints and a tokenizer for tests and benchmarks.

May import: llama.args, llama.model, llama.layers, llama.quantize, llama.hf (the Hub layout as a
source), llama.engine.validation and .distributed. Never generation, the server or the CLI.
"""
