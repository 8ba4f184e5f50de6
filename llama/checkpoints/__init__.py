"""Checkpoints on disk and onto a rank.

- params.py: params.json read and checked (Llama 2 and 3.x fields), ModelArgs from it;
- meta.py: Meta's layout (shards, which dimension each tensor is split on, each rank's
  slices, strict checks);
- memory.py, memory_fit.py, host_memory.py: what a model holds per rank, the check before
  loading that it fits, pages handed back while loading;
- saving.py, reshard.py: writing Meta's layout one shard at a time, for any shard count;
- checklist.py: md5 checklists (also a standalone script for download.sh);
- fixtures.py: random checkpoints and a tokenizer for tests and benchmarks.

Loading a directory of either layout onto a rank (load_model) is llama/loading.py, above this
package and llama/hf, which reads the Hub's layout with this package's rules.

May import: llama.args, llama.errors, llama.rope_scaling, llama.model, llama.layers,
llama.kernels, llama.quantize, and llama.cli.flags for the reshard and checklist commands'
parsers. Never llama.hf, the engine, generation or the server.
"""
