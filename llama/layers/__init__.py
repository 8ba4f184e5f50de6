"""The model's building blocks below llama/model.py: what one forward needs.

- plan.py: the step plan, one typed object per forward (Prefill, Span, Decode, Mixed) that
  writes the KV cache and picks the attention; attend.py: the attention math it calls;
- cache.py: the KV cache, masks over its slots, packing of left-padded batches, mixed steps;
- rotary.py, rope_scaling.py: rotary position embedding (Meta's names) and its scalings
  (llama3, linear, dynamic);
- linear.py: every matrix product and the weight formats that carry their own route (float,
  FloatKernel, PackedInt8, PackedInt4); bf16.py: bfloat16 weights under float32 activations;
- fused.py: Projection, a module's product over one or several layers' weights (q/k/v and
  w1/w3 fused), with its rank reduction and the forward-hook fallback;
- parallel.py, views.py: fairscale's layers as the model uses them; tensors used as one.

May import: llama.args, llama.kernels, llama.quantize. Nothing above the model.
"""
