"""A compiled decode step is never kept where it is slower than the eager one
(llama/engine/compiled.py): the first steps of each shape are timed both ways."""

import functools
import time

from llama.engine.compiled import TRIALS, CompiledOrEager

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def _run(choice, seconds_of):
    """Drives `choice` as the engine does; seconds_of(compiled) is each step's time."""
    taken = []
    for _ in range(2 + 2 * TRIALS + 3):
        compiled = choice.next()
        taken.append(compiled)
        choice.took(seconds_of(compiled))
    return taken


def test_the_faster_kind_wins_after_the_compiling_call():
    slow_compiled = CompiledOrEager()
    taken = _run(slow_compiled, lambda compiled: 0.02 if compiled else 0.01)
    # the compiling call and an eager one untimed, then eager and compiled in turn, then
    # eager for good
    assert taken[:2 + 2 * TRIALS] == [True, False] + [False, True] * TRIALS
    assert slow_compiled.verdict is False and taken[2 + 2 * TRIALS:] == [False] * 3
    assert len(slow_compiled.times[True]) == len(slow_compiled.times[False]) == TRIALS
    fast_compiled = CompiledOrEager()
    taken = _run(fast_compiled, lambda compiled: 0.01 if compiled else 0.02)
    assert fast_compiled.verdict is True and taken[2 + 2 * TRIALS:] == [True] * 3
    # a verdict given (GPUs: compiled) is never measured
    given = CompiledOrEager(True)
    assert _run(given, lambda compiled: 1.0) == [True] * (5 + 2 * TRIALS)
    assert given.times == {True: [], False: []}


def test_a_slower_compiled_step_is_dropped_and_the_tokens_stay(build):
    """The compiled function replaced by the eager forward made slower (no compilation in a
    test): generation leaves it after the trials, keeps the verdict for the shape, and gives
    the tokens of a plain eager call."""
    generator = build("gqa")
    expected = generator.text_completion(PROMPTS, temperature=0, max_gen_len=12)
    generator.compile_decode()
    eager = functools.partial(type(generator.model).forward.__wrapped__, generator.model)
    calls = []

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(0.05)
        return eager(*args, **kwargs)

    generator._compiled_step.function = slow
    try:
        got = generator.text_completion(PROMPTS, temperature=0, max_gen_len=12)
        (choice,) = generator._compiled_step.choices.values()
        assert choice.verdict is False and len(calls) == 1 + TRIALS, choice.times
        assert [r["generation"] for r in got] == [r["generation"] for r in expected]
        calls.clear()  # the same shape again: no more trials, no compiled step
        again = generator.text_completion(PROMPTS, temperature=0, max_gen_len=12)
        assert calls == [] and again == got
    finally:
        generator._compiled_step = None  # the generator is shared
