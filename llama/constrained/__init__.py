"""Answers that must match a grammar: JSON schemas, regexes, Lark grammars and tool calls.

- spec.py: what a caller asks for (response_format, regex, grammar) as one GrammarSpec;
- grammar.py: the grammar engine (llguidance) over the tokenizer's vocabulary, compiled once
  per grammar;
- constraint.py: one row's constraint inside the batch (its token mask, and closing the
  answer before its token budget runs out);
- calling.py: tool calls in the tokenizer family's format, for the library and the server:
  tools.py (a JSON convention for Llama 2 chat models), tools3.py (Llama 3.1's own format);
  call_stream.py reads a call answer, whole or piece by piece as it streams.

May import: the tokenizers, the chat formats and llama.engine's hooks. Used by
llama.generation, the session and the server.
"""
