"""The OpenAI-compatible HTTP server (`python -m llama.server`): the app and its routes
(app.py), the scheduler that batches requests into engine steps on one thread (scheduler.py),
the OpenAI wire format (openai_api.py) and the chat page (static/chat.html).

May import: llama.generation, llama.engine, llama.chat_format. Nothing imports it.
"""
