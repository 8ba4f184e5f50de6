"""The decode engine as a server drives it: sequences join a running batch in free slots,
finished ones free theirs at once, and each row's tokens are those it gets alone."""

import pytest
import torch

from llama.engine.core import Engine, EngineSequence
from llama.engine.sampling import RowNoise
from llama.engine.text import TextTracker
from llama.kernels import cpu_kernels
from tests.meta_reference import ReferenceModel

PROMPTS = ["The meaning of life is", "x = 1", "In Python, a class is a", "Return the",
           "上下五千年，英雄万万千。", "import os"]


def _encode(generator, text):
    return generator.tokenizer.encode(text, bos=True, eos=False)


def _server_engine(generator, slots=3, length=64, chunk=0):
    return Engine(generator.model, generator.tokenizer.eos_id,
                  generator.model.new_cache(slots, length), release_finished=True,
                  prefill_chunk=chunk)


# Prompts prefilled alone as they join (0), or riding with the decode rows: several prompts in
# one step (64), or each in chunks of 4 tokens over several steps (4; the prompts are 4-15).
CHUNKS = [pytest.param(0, id="prefill-alone"), pytest.param(64, id="chunk64"),
          pytest.param(4, id="chunk4")]


def _run(engine, arrivals):
    """Add each sequence at its step (step: [sequences]), stepping until all are done."""
    step, pending = 0, dict(arrivals)
    everything = [s for group in arrivals.values() for s in group]
    while not all(s.finished for s in everything):
        for seq in pending.pop(step, []):
            engine.add(seq)
        engine.step()
        step += 1
        assert len(engine.sequences) <= len(engine.slots)
    return everything


# torch's routes; our CPU attention over each row's own slots where it is vectorised; and with
# it our float32 products (use_native_kernels), whose rows do not depend on each other
KERNELS = [pytest.param("torch"),
           pytest.param("attention", marks=pytest.mark.skipif(
               not cpu_kernels.fast_attention(), reason="no AVX-512 or AVX2")),
           pytest.param("all", marks=pytest.mark.skipif(
               not cpu_kernels.fast_float(), reason="no vectorised build"))]


def _use(model, kernels):
    if kernels == "attention":
        model.native_attention = True
    elif kernels == "all":
        assert model.use_native_kernels()


LIMITS = [12, 5, 9, 14, 7, 10]


@pytest.fixture(scope="module")
def alone(build):
    """generate()'s greedy tokens and logprobs of each of PROMPTS alone (LIMITS tokens), by
    (kind, kernels): what every chunk size's engine must give, computed once for them all."""
    made = {}

    def _alone(kind, kernels):
        if (kind, kernels) not in made:
            generator = build(kind, max_seq_len=64, max_batch_size=4)
            _use(generator.model, kernels)
            made[kind, kernels] = [generator.generate([_encode(generator, p)], limit,
                                                      temperature=0, logprobs=True)
                                   for p, limit in zip(PROMPTS, LIMITS)]
        return made[kind, kernels]

    return _alone


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_greedy_rows_joining_a_busy_batch_get_their_tokens_alone(kind, kernels, chunk, build,
                                                                 alone):
    generator = build(kind, max_seq_len=64, max_batch_size=4)
    _use(generator.model, kernels)
    seqs = [EngineSequence(prompt=_encode(generator, p), limit=limit, logprobs=True)
            for p, limit in zip(PROMPTS, LIMITS)]
    # three slots for six sequences: later ones wait for a slot and reuse its cache
    engine = _server_engine(generator, slots=3, chunk=chunk)
    arrivals = {0: seqs[:1], 2: seqs[1:3], 6: seqs[3:4], 9: seqs[4:5], 13: seqs[5:]}
    step, pending, waiting = 0, dict(arrivals), []
    while not all(s.finished for s in seqs):
        waiting += pending.pop(step, [])
        while waiting and engine.free_slots:
            engine.add(waiting.pop(0))
        engine.step()
        step += 1
    for seq, (tokens, logprobs) in zip(seqs, alone(kind, kernels)):
        assert seq.tokens == tokens[0]
        if kernels == "all" and not chunk:  # every product and attention row by row: the
            assert seq.token_logprobs == logprobs[0]  # same bits (a chunk's step: oneDNN's)
        assert seq.token_logprobs == pytest.approx(logprobs[0], abs=1e-4)
        assert seq.finish_reason == ("length" if len(seq.tokens) == seq.limit else "stop")
        assert seq.slot == -1  # released
    assert engine.free_slots == 3 and not engine.sequences


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kernels", KERNELS)
def test_each_rows_step_equals_a_full_forward_over_its_text(kernels, chunk, build, checkpoints):
    """Rows at different cache positions (one prefilled while another decodes): each step's
    logits are those of the restated reference run over that row's whole text."""
    generator = build("gqa", max_seq_len=64, max_batch_size=4)
    _use(generator.model, kernels)
    reference = ReferenceModel(checkpoints.state("gqa"), checkpoints.params("gqa"), 1, 64)
    engine = _server_engine(generator, slots=2, chunk=chunk)
    first = EngineSequence(prompt=_encode(generator, PROMPTS[2]), limit=10)
    second = EngineSequence(prompt=_encode(generator, PROMPTS[0]), limit=6)
    engine.add(first)
    for _ in range(3):
        engine.step()
    engine.add(second)
    for _ in range(5):
        engine.step()
        for seq in filter(lambda seq: seq.decoding, engine.sequences):
            text = torch.tensor([seq.prompt + seq.tokens])
            expected = reference.forward(text, 0)[0, -1]
            torch.testing.assert_close(engine.logits[seq.slot], expected, atol=1e-4,
                                       rtol=1e-4)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_seeded_samples_are_the_same_alone_or_in_a_batch(chunk, build):
    generator = build("gqa", max_seq_len=64, max_batch_size=4)
    vocab = generator.model.params.vocab_size

    def seq(seed, prompt=PROMPTS[0]):
        return EngineSequence(prompt=_encode(generator, prompt), limit=12, temperature=0.9,
                        top_p=0.95, noise=RowNoise(seed, vocab, "cpu"))

    alone = _run(_server_engine(generator), {0: [seq(5)]})[0].tokens
    crowd = [seq(7, PROMPTS[1]), EngineSequence(prompt=_encode(generator, PROMPTS[3]), limit=8)]
    joined = seq(5)
    _run(_server_engine(generator, chunk=chunk), {0: crowd, 3: [joined]})
    assert joined.tokens == alone
    other_seed = _run(_server_engine(generator), {0: [seq(6)]})[0].tokens
    assert other_seed != alone  # the seed matters


def test_top_logprobs_are_the_most_likely_tokens(build):
    generator = build("gqa", max_seq_len=64, max_batch_size=4)
    seq = EngineSequence(prompt=_encode(generator, PROMPTS[0]), limit=4, logprobs=True,
                   top_logprobs=3)
    _run(_server_engine(generator), {0: [seq]})
    full = generator.model.forward(torch.tensor([seq.prompt + seq.tokens]), 0,
                                   generator.model.new_cache(1, 64))
    logp = torch.log_softmax(full[0], dim=-1)
    for k, (token, top) in enumerate(zip(seq.tokens, seq.top)):
        position = len(seq.prompt) - 1 + k
        values, ids = logp[position].topk(3)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
        assert top[0][0] == token  # greedy: the chosen token is the most likely
        assert seq.token_logprobs[k] == pytest.approx(values[0].item(), abs=1e-4)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_stop_strings_and_limits_free_slots_for_waiting_rows(chunk, build):
    generator = build("gqa", max_seq_len=64, max_batch_size=4)
    reference = generator.text_completion([PROMPTS[2]], temperature=0, max_gen_len=16)[0]
    stop = reference["generation"][4:7]
    tracked = EngineSequence(prompt=_encode(generator, PROMPTS[2]), limit=16,
                       text=TextTracker(generator.tokenizer, [stop]))
    engine = _server_engine(generator, slots=1, chunk=chunk)
    engine.add(tracked)
    while not tracked.finished:
        engine.step()
    assert tracked.finish_reason == "stop" and tracked.text.text == \
        reference["generation"][:4]
    assert engine.free_slots == 1  # the stop string freed the slot at once
    short = EngineSequence(prompt=_encode(generator, PROMPTS[3]), limit=2)
    engine.add(short)
    while not short.finished:
        engine.step()
    assert short.finish_reason == "length" and len(short.tokens) == 2 and engine.free_slots == 1


def test_a_joining_prompt_rides_with_the_decode_rows_in_chunks(build, monkeypatch):
    """With prefill_chunk, a prompt joining a running batch is not prefilled on its own: each
    step runs the model once, over the decode rows' tokens and the next chunk of the prompt
    (4 tokens a step here), until the prompt is in and it decodes with the others."""
    generator = build("gqa", max_seq_len=64, max_batch_size=4)
    model = generator.model
    calls = []
    original = model.forward_segments
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append("forward") or
                        type(model).forward(model, *a, **k))
    monkeypatch.setattr(model, "forward_segments", lambda tokens, seg, cache: calls.append(
        (seg.rows, seg.chunks)) or original(tokens, seg, cache))
    engine = _server_engine(generator, slots=2, chunk=4)
    first = EngineSequence(prompt=_encode(generator, PROMPTS[1]), limit=20)
    engine.add(first)
    while not first.decoding:
        engine.step()
    engine.step()
    second = EngineSequence(prompt=_encode(generator, PROMPTS[2] + " " + PROMPTS[0]), limit=3)
    assert len(second.prompt) > 8 and len(second.prompt) % 4  # 3 chunks or more, one short
    engine.add(second)
    calls.clear()
    while not second.finished:
        engine.step()
    chunks = -(-len(second.prompt) // 4)
    assert "forward" not in calls[:chunks]  # no prefill of its own, no decode-only step
    assert [rows for rows, _ in calls[:chunks]] == [1] * chunks  # the first row decodes on
    assert [c for _, c in calls[:chunks]] == [
        [(1, start, min(4, len(second.prompt) - start))] for start in range(0, chunks * 4, 4)]
    assert calls[chunks:] == ["forward"] * 3  # then decode steps of both rows (3 tokens)
    alone = generator.generate([second.prompt], 3, temperature=0)[0][0]
    assert second.tokens == alone


@pytest.mark.parametrize("chunk", [4, 64])
def test_a_prompt_cancelled_midway_frees_its_slot_for_the_next(chunk, build):
    generator = build("gqa", max_seq_len=64, max_batch_size=4)
    engine = _server_engine(generator, slots=1, chunk=chunk)
    cancelled = EngineSequence(prompt=_encode(generator, PROMPTS[2]), limit=10)
    engine.add(cancelled)
    engine.step()
    assert chunk == 64 or not cancelled.decoding  # still prefilling, with chunks of 4
    engine.release(cancelled)
    assert engine.free_slots == 1 and not engine.prefilling
    nxt = EngineSequence(prompt=_encode(generator, PROMPTS[5]), limit=6)
    _run(engine, {0: [nxt]})
    assert nxt.tokens == generator.generate([nxt.prompt], 6, temperature=0)[0][0]
    empty = EngineSequence(prompt=_encode(generator, PROMPTS[0]), limit=0)  # a full-length prompt
    _run(engine, {0: [empty]})
    assert empty.tokens == [] and empty.finish_reason == "length" and engine.free_slots == 1


def test_prefill_chunk_must_be_a_count():
    with pytest.raises(ValueError, match="prefill_chunk must be an int >= 0, got -1"):
        Engine(None, 2, None, prefill_chunk=-1)
