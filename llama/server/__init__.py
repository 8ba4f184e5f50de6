"""The OpenAI-compatible HTTP server (`python -m llama.server`).

- app.py: the FastAPI app, its routes and command line; run.py: one request's choices on the
  scheduler, answered whole or streamed;
- scheduler.py: continuous batching on one thread, every rank in step (typed admissions);
- openai_api.py, openai_options.py, errors.py: OpenAI's wire format, its optional fields
  (response_format, tools, n, penalties) and error objects;
- http_guard.py: what a client may send (body size and time, content type, Host,
  connections); metrics.py: the access log and /metrics;
- static/chat.html: the chat page.

May import: llama.generation, llama.engine, llama.constrained, the chat formats. Nothing
imports it.
"""
