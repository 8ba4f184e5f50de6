"""The model's building blocks below llama/model.py: what one forward needs.

- plan.py: the step plan, one typed object per forward (Prefill, Span, Decode, Mixed) that
  writes the KV cache and picks the attention; attend.py: the attention math it calls;
- cache.py: the KV cache, masks over its slots, packing of left-padded batches, mixed steps;
- rotary.py: rotary position embedding (Meta's names), scaled as llama/rope_scaling.py says
  (llama3, linear, dynamic);
- linear.py (float_linear.py for float weights): every matrix product and the weight formats
  that carry their own route (float, FloatKernel, PackedInt8, PackedInt4); bf16.py: bfloat16
  weights under float32 activations; w8a8.py: int8 and int4 weights with int8 activations
  (opt-in; each packed weight's `with_int8_activations()`);
- fused.py: Projection, a module's product over one or several layers' weights (q/k/v and
  w1/w3 fused), with its rank reduction and the forward-hook fallback;
- parallel.py: fairscale's layers as the model uses them.

May import: llama.args, llama.errors, llama.rope_scaling, llama.views, llama.kernels,
llama.quantize. Nothing above the model.
"""
