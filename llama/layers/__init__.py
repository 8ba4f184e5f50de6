"""The model's building blocks below llama/model.py: what one forward needs.

- plan.py: the step plan, one typed object per forward (prefill, span, decode, mixed) that
  writes the KV cache and picks the attention;
- attend.py: the attention math each plan calls (causal prefill, masked, decode kernel, mixed);
- cache.py: the KV cache, masks over its slots, packing of left-padded batches, mixed steps;
- rotary.py: rotary position embedding (Meta's names, re-exported by llama.model);
- linear.py: every matrix product and the weight formats that carry their route (float,
  FloatKernel, PackedInt8, PackedInt4);
- fused.py: Projection, a module's product over one or several layers' weights (q/k/v, w1/w3
  fused), with its rank reduction and the forward-hook fallback;
- parallel.py, views.py: fairscale's layers as the model uses them; tensors used as one.

May import: llama.args, llama.kernels, llama.quantize (formats). Never the engine, serving or
CLI above it.
"""
