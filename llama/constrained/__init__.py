"""Answers that must match a grammar: JSON schemas, regexes, Lark grammars and tool calls.

- spec.py: what a caller asks for (response_format, regex, grammar) as one GrammarSpec;
- grammar.py: the grammar engine (llguidance) over the tokenizer's vocabulary, compiled once
  per grammar;
- constraint.py: one row's constraint inside the batch (its token mask, and closing the
  answer before its token budget runs out);
- tools.py: the tool-calling convention for Llama 2 chat models.

May import: the tokenizers and llama.engine's hooks. Used by llama.generation, the session and
the server.
"""
