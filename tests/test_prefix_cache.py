"""The server's prefix cache (llama/engine/prefix_cache.py): requests that begin as earlier ones did
copy those blocks' keys and values and prefill the rest, with the same tokens as without it,
alone or in a busy batch, prefilled at once or in chunks, under a budget that evicts."""

import pytest
import torch

from llama.engine.core import Engine, EngineSequence
from llama.engine.prefix_cache import PrefixCache, PrefixCacheError
from llama.layers.cache import KVCache

SYSTEM = "<<SYS>>\nAnswer briefly and well.\n<</SYS>>\n\n"
QUESTIONS = ["What is a list?", "How do I open a file?", "What does yield do?",
             "Explain decorators.", "What is a class?"]


def _encode(generator, text):
    return generator.tokenizer.encode(text, bos=True, eos=False)


def _engine(generator, prefixes, slots=3, length=160, chunk=0):
    return Engine(generator.model, generator.tokenizer.eos_id,
                  generator.model.new_cache(slots, length), release_finished=True,
                  prefill_chunk=chunk, prefix_cache=prefixes)


def _serve(engine, groups, limit):
    """Each group of prompts arrives once the previous group is done; a group's prompts are
    admitted as slots free up, while the others decode. Returns each prompt's tokens."""
    results = []
    for prompts in groups:
        waiting = [EngineSequence(prompt=list(p), limit=limit) for p in prompts]
        seqs = list(waiting)
        while not all(s.finished for s in seqs):
            while waiting and engine.free_slots:
                engine.add(waiting.pop(0))
            engine.step()
        results += [s.tokens for s in seqs]
    return results


def _chat_turns(generator, limit):
    """Two conversations of three turns, each turn's prompt the whole conversation so far
    (as a chat client sends it), the answers generated without any cache."""
    eos = generator.tokenizer.eos_id
    groups, histories = [], [[], []]
    for turn in range(3):
        group = []
        for who, history in enumerate(histories):
            question = QUESTIONS[(turn + who) % len(QUESTIONS)]
            history += _encode(generator, f"[INST] {SYSTEM if turn == 0 else ''}{question} "
                                          f"[/INST]")
            group.append(list(history))
        answers, _ = generator.generate(group, limit, temperature=0)
        for history, answer in zip(histories, answers):
            history += answer + [eos]
        groups.append(group)
    return groups


@pytest.mark.parametrize("chunk", [pytest.param(0, id="prefill-alone"),
                                   pytest.param(5, id="chunk5")])
@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_chat_turns_reuse_earlier_blocks_and_answer_alike(kind, chunk, build):
    generator = build(kind, max_seq_len=160, max_batch_size=2)
    limit = 10
    groups = _chat_turns(generator, limit)
    expected = _serve(_engine(generator, None, chunk=chunk), groups, limit)
    prefixes = PrefixCache(capacity=64, block_size=4)
    got = _serve(_engine(generator, prefixes, chunk=chunk), groups, limit)
    assert got == expected
    # every later turn found its conversation's blocks: only the new turn (and the last
    # partial block before it) was prefilled
    total = sum(len(p) for group in groups for p in group)
    first = sum(len(p) for p in groups[0])
    assert prefixes.hit_tokens + prefixes.prefilled_tokens == total
    # (the second conversation's first turn may find the first's system prompt, if its
    # prefill is done when the second joins)
    assert prefixes.hits + prefixes.misses == 6 and prefixes.hits >= 4
    new = sum(len(p) - len(q) for later, earlier in zip(groups[1:], groups) for p, q in
              zip(later, earlier))
    assert prefixes.prefilled_tokens <= first + new + 2 * 4 * 2
    assert prefixes.hit_tokens >= total - first - new - 2 * 4 * 2


def test_concurrent_requests_sharing_a_system_prompt_and_a_tiny_budget(build):
    generator = build("gqa", max_seq_len=160, max_batch_size=2)
    prompts = [_encode(generator, f"[INST] {SYSTEM}{q} [/INST]") for q in QUESTIONS]
    limit = 8
    expected = [generator.generate([p], limit, temperature=0)[0][0] for p in prompts]
    # five at once on three slots: the first ones store the shared blocks while the later
    # ones wait, which then find them
    prefixes = PrefixCache(capacity=64, block_size=4)
    assert _serve(_engine(generator, prefixes), [prompts, prompts], limit) == expected * 2
    assert prefixes.hits >= 2 + 5 and prefixes.hit_tokens > 0
    # a budget of 3 blocks: blocks come and go at every request, answers stay the same
    tiny = PrefixCache(capacity=3, block_size=4)
    assert _serve(_engine(generator, tiny), [prompts, prompts[::-1]], limit) == \
        expected + expected[::-1]
    assert len(tiny.blocks) == 3 and tiny.hits > 0


def test_the_schedulers_load_reports_the_prefix_cache(build):
    from llama.server.scheduler import Scheduler

    generator = build("gqa", max_seq_len=64, max_batch_size=1)
    assert Scheduler(_engine(generator, None), generator.tokenizer).load["prefix_cache"] is None
    prefixes = PrefixCache(capacity=5, block_size=4)
    load = Scheduler(_engine(generator, prefixes), generator.tokenizer).load
    assert load["prefix_cache"] == {"blocks": 0, "capacity_blocks": 5, "block_size": 4,
                                    "hits": 0, "misses": 0, "hit_tokens": 0,
                                    "prefilled_tokens": 0}


def _cache(n_layers=2, rows=2, heads=2, length=16, head_dim=3):
    cache = KVCache(n_layers, rows, heads, length, head_dim, "cpu", torch.float32)
    for layer in range(n_layers):
        cache.k[layer].copy_(torch.randn(cache.k[layer].shape))
        cache.v[layer].copy_(torch.randn(cache.v[layer].shape))
    return cache


def test_blocks_are_named_by_their_whole_prefix_and_copied_exactly():
    prefixes = PrefixCache(capacity=8, block_size=4)
    a, b = [1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 2, 3, 4, 5, 6, 7, 8, 9]
    assert len(prefixes.keys(a)) == 2
    assert prefixes.keys(a)[1] != prefixes.keys(b)[1]  # the same tokens after another block
    assert prefixes.keys(a) == prefixes.keys(a[:8])
    source, target = _cache(), _cache()
    prefixes.store(a, source, row=1)
    assert len(prefixes.blocks) == 2
    # a prompt of exactly two blocks finds only the first: its last token must still run
    assert prefixes.load(a[:8], target, row=0) == 4
    assert prefixes.load(a + [3], target, row=0) == 8
    assert prefixes.load(b, target, row=0) == 0
    for layer in range(2):
        assert torch.equal(target.k[layer][0, :, :8], source.k[layer][1, :, :8])
        assert torch.equal(target.v[layer][0, :, :8], source.v[layer][1, :, :8])
    assert (prefixes.hits, prefixes.misses, prefixes.hit_tokens) == (2, 1, 12)


def test_the_least_recently_used_go_first_a_prefix_from_its_end():
    prefixes = PrefixCache(capacity=3, block_size=2)
    cache = _cache()
    first, second = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10]
    prefixes.store(first, cache, 0)  # 3 blocks: full
    prefixes.store(second, cache, 1)  # evicts first's last two blocks, its end first
    f, s = prefixes.keys(first), prefixes.keys(second)
    assert list(prefixes.blocks) == [f[0], s[1], s[0]]  # oldest use first
    assert prefixes.load(first + [0], cache, 1) == 2  # the beginning is still found
    prefixes.store(first, cache, 0)  # used again: second's end goes
    assert set(prefixes.blocks) == set(prefixes.keys(first))


def test_a_budget_too_small_for_a_block_is_refused():
    cache = _cache()  # 2 layers x 2 heads x 3 dims x 2 (k, v) x 4 bytes = 96 bytes a token
    assert PrefixCache.with_megabytes(1, cache, block_size=16).capacity == 2 ** 20 // (96 * 16)
    with pytest.raises(PrefixCacheError, match="cannot hold one block of 16 tokens"):
        PrefixCache.with_megabytes(0.001, cache, block_size=16)
    with pytest.raises(PrefixCacheError, match="at least one block"):
        PrefixCache(0)


def test_a_prefill_that_fails_offers_only_what_the_row_held(build, monkeypatch):
    generator = build("gqa", max_seq_len=64, max_batch_size=1)
    prefixes = PrefixCache(capacity=16, block_size=4)
    engine = _engine(generator, prefixes, slots=1, length=64)
    prompt = _encode(generator, f"[INST] {SYSTEM}{QUESTIONS[0]} [/INST]")
    seq = EngineSequence(prompt=prompt, limit=2)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(generator.model, "forward", out_of_memory)
    with pytest.raises(RuntimeError):
        engine.add(seq)
    engine.release(seq)  # as the scheduler does for a request that failed to join
    assert not prefixes.blocks
