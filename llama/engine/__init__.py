"""The decode engine that the library's calls, chat sessions and the server share.

- core.py: sequences in cache slots, prefill (alone, from a cached prefix, or in chunks riding
  with the decode rows) and decode steps;
- compiled.py: the torch.compile'd decode step, and the clock's choice between it and eager;
- sampling.py: greedy and top-p sampling and the random draws they use;
- logits.py, penalties.py: per-row logit adjustments inside the batch (penalties, logit bias,
  grammar masks);
- prefix_cache.py: prompts' KV blocks kept for requests that begin alike (the server's);
- text.py: incremental detokenisation and stop strings; results.py: a call's results as the
  reference gives them; stream.py: a streamed answer;
- distributed.py: process groups, device choice, the same decisions on every rank;
- validation.py: argument checks and their typed errors.

May import: llama.model, llama.layers, llama.constrained (masks), the chat formats. Never
llama.generation, the server or the CLI.
"""
