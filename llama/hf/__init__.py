"""Hugging Face's layout: config.json read and written (config.py), safetensors read as a
checkpoint source and written (format.py), conversion both ways (convert.py; `python -m
llama.convert`), and the bridge to transformers' LlamaForCausalLM (bridge.py).

May import: llama.args, llama.errors, llama.rope_scaling, llama.checkpoints (meta.py,
saving.py, host_memory.py), llama.cli.flags (the conversion command's parser), the
tokenizers. Read by llama/loading.py.
"""
