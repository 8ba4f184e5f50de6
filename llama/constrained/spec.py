"""Structured output as callers ask for it: OpenAI's `response_format`, or a regex or Lark
grammar, turned into a GrammarSpec; and the constraints of a batch's rows built from it.

response_format is {"type": "text"} (no constraint), {"type": "json_object"} (any JSON
object), {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}
or, in the library, a pydantic model class (its JSON schema).
"""

from typing import Any, Optional

from llama.constrained.constraint import Constraint, ConstraintError
from llama.constrained.grammar import GrammarError, GrammarSpec, vocabulary
from llama.errors import ArgumentTypeError, ArgumentValueError

FORMATS = ("text", "json_object", "json_schema")


def schema_of(model: Any) -> Optional[dict]:
    """The JSON schema of a pydantic model class, or None if `model` is not one."""
    if isinstance(model, type) and hasattr(model, "model_json_schema"):
        return model.model_json_schema()
    return None


def response_format_spec(response_format: Any,
                         param: str = "response_format") -> Optional[GrammarSpec]:
    """The grammar OpenAI's response_format asks for (None for text or None)."""
    if response_format is None:
        return None
    schema = schema_of(response_format)
    if schema is not None:
        return _spec(lambda: GrammarSpec.json_schema(schema), param)
    if not isinstance(response_format, dict):
        raise ArgumentTypeError(param, f"{param} must be an object such as "
                                       f'{{"type": "json_object"}}, got {response_format!r}')
    kind = response_format.get("type")
    if kind not in FORMATS:
        raise ArgumentValueError(param, f"{param}.type must be one of {', '.join(FORMATS)}, "
                                        f"got {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec.json_object()
    inner = response_format.get("json_schema")
    if not isinstance(inner, dict) or "schema" not in inner:
        raise ArgumentValueError(param, f'{param} of type "json_schema" needs "json_schema": '
                                        f'{{"name": ..., "schema": {{...}}}}')
    return _spec(lambda: GrammarSpec.json_schema(inner["schema"]), param)


def grammar_spec(response_format: Any = None, regex: Optional[str] = None,
                 grammar: Optional[str] = None) -> Optional[GrammarSpec]:
    """The one grammar of the library's options (response_format, regex, Lark grammar)."""
    given = [name for name, value in (("response_format", response_format), ("regex", regex),
                                      ("grammar", grammar)) if value is not None]
    if len(given) > 1:
        raise ArgumentValueError(given[1], f"{given[1]}: give one of response_format, regex "
                                           f"and grammar, not {' and '.join(given)}")
    if regex is not None:
        return _spec(lambda: GrammarSpec.regex(regex), "regex")
    if grammar is not None:
        return _spec(lambda: GrammarSpec.lark(grammar), "grammar")
    return response_format_spec(response_format)


PARAMS = {"json_schema": "response_format", "json_object": "response_format",
          "regex": "regex", "lark": "grammar"}


def make_constraint(tokenizer, n_vocab: int, spec: GrammarSpec, limit: int,
                    param: Optional[str] = None, budget_param: str = "max_gen_len"
                    ) -> Constraint:
    """A row's Constraint; grammar errors name `param` (by default the library's option for
    the spec's kind), a budget too small `budget_param`."""
    param = param or PARAMS[spec.kind]
    try:
        return Constraint(vocabulary(tokenizer, n_vocab), spec, limit)
    except ConstraintError as error:
        raise ArgumentValueError(budget_param, f"{budget_param}: {error}") from None
    except GrammarError as error:
        raise ArgumentValueError(param, f"{param}: {error}") from None


def check_no_stop(spec: Optional[GrammarSpec], stop) -> None:
    """Stop strings could cut a constrained answer before it is complete."""
    if spec is not None and stop:
        raise ArgumentValueError("stop", "stop strings cannot be combined with a response "
                                         "format or grammar (they could cut the answer "
                                         "before it is complete); leave stop out")


def _spec(make, param: str) -> GrammarSpec:
    try:
        return make()
    except GrammarError as error:
        raise ArgumentValueError(param, f"{param}: {error}") from None
