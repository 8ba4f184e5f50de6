"""The decode engine: a KV cache whose rows are slots, sequences prefilled into free slots, and
one decode step for every occupied slot (sample, stop checks, then the model on the new
tokens). The library API (Llama.generate, text_completion, chat_completion, the streams) and
the server's continuous batching drive this same step.

A library call prefills its whole batch at once, left-padded, and keeps every row in the
batch until all are done, as the reference does (so its results are the reference's). A
server adds sequences one by one into free slots while others decode, and frees a slot as soon
as its sequence ends; each row then writes and reads its own cache positions. With
`prefill_chunk`, a sequence added is not prefilled at once: its prompt rides with the next
steps' decode rows, up to prefill_chunk prompt tokens a step (cache.Segments), so the batch
never stops for a prefill and the weights are read once for both.

A sequence may start with keys and values already in its row: a conversation's earlier turns
(`add(seq, cached=n)`, session.py), or blocks of earlier prompts kept by a server's
`prefix_cache` (prefix_cache.py), copied in; only the rest of its prompt is prefilled.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Collection, List, Optional, Tuple, Union

import torch

from llama.engine.logits import constrain_logits, take_constrained
from llama.engine.sampling import ReferenceNoise, RowNoise, sample
from llama.engine.text import TextTracker
from llama.layers.cache import KVCache, Segments


@dataclass
class EngineSequence:
    """One prompt's generation: what was asked, and what has come of it."""
    prompt: List[int]
    limit: int  # tokens it may generate (max_gen_len, or what is left of max_seq_len)
    temperature: float = 0.0
    top_p: float = 1.0
    logprobs: bool = False  # keep each token's log-probability
    top_logprobs: int = 0  # and the most likely alternatives' at each step
    text: Optional[TextTracker] = None  # its text, when streaming or checking stop strings
    noise: Optional[RowNoise] = None  # its own random draws (server); None: the batch's
    constraint: Optional[object] = None  # its grammar (constraint.Constraint), if any
    adjust: Optional[object] = None  # penalties and logit bias (penalties.LogitAdjust), if any
    tokens: List[int] = field(default_factory=list)
    token_logprobs: List[float] = field(default_factory=list)
    top: List[List[Tuple[int, float]]] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" (a stop token or string) or "length"
    slot: int = -1  # its row of the cache
    start: int = 0  # its first cache slot (left padding before it)
    position: int = 0  # the cache slot its next token goes to
    prefilled: int = 0  # prompt tokens in the cache (all of them once it decodes)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def decoding(self) -> bool:
        """Its prompt is in the cache: it has next-token logits."""
        return self.prefilled == len(self.prompt)

    def accept(self, token: int, stop_ids: Collection[int], logprob: float = 0.0,
               top: Optional[List[Tuple[int, float]]] = None) -> None:
        """Take a sampled token. A stop token (EOS; Llama 3's end of turn...) ends the sequence
        without becoming part of it; so does reaching the limit, or a stop string appearing
        in the text (cut before it)."""
        if self.finished:
            return  # a finished row in a batch still steps; its tokens are discarded
        if token in stop_ids:
            self.finish_reason = "stop"
            return
        self.tokens.append(token)
        if self.logprobs:
            self.token_logprobs.append(logprob)
        if top is not None:
            self.top.append(top)
        if self.text is not None and self.text.add(token):
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.limit:
            self.finish_reason = "length"


class Engine:
    """Sequences in the slots of `cache`; `step()` advances every occupied slot by a token.

    `compiled_step(tokens, positions, cache, pads)`, if given, is the model's forward compiled
    for one token per row (compiled.CompiledDecode, whose choice(cache) times it against the
    eager step and says which each step takes): it runs its steps over all the slots
    of `cache`, whose tensors keep their addresses, and each sequence added is prefilled at
    once. Otherwise, with `prefill_chunk` > 0, prompts ride with the decode steps (see the
    module's docstring)."""

    def __init__(self, model, stop_ids: Union[int, Collection[int]], cache: KVCache,
                 compiled_step: Optional[Callable] = None, release_finished: bool = False,
                 prefill_chunk: int = 0, prefix_cache=None):
        self.model, self.cache = model, cache
        # the tokens that end a sequence (tokenizers.stop_tokens); one int is an EOS id alone
        self.stop_ids = frozenset([stop_ids] if isinstance(stop_ids, int) else stop_ids)
        self.prefix_cache = prefix_cache  # a PrefixCache shared by the sequences added, or None
        self.compiled_step = compiled_step
        # with a compiled step: whether each step takes it or the eager one (compiled.py)
        self.step_choice = compiled_step.choice(cache) if compiled_step is not None else None
        self.release_finished = release_finished  # server: free a slot as its row ends
        if not isinstance(prefill_chunk, int) or prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be an int >= 0, got {prefill_chunk!r}")
        self.prefill_chunk = 0 if compiled_step is not None else prefill_chunk
        self.slots: List[Optional[EngineSequence]] = [None] * cache.rows
        self.device = model.output.weight.device
        with torch.inference_mode(False):  # ordinary tensors, which a compiled step can take
            self.positions = torch.zeros(cache.rows, dtype=torch.long, device=self.device)
            self.starts = torch.zeros(cache.rows, dtype=torch.long, device=self.device)
            # 1 for an occupied slot: only those advance (a free slot stays at slot 0)
            self.occupied = torch.zeros(cache.rows, dtype=torch.long, device=self.device)
        self.logits: Optional[torch.Tensor] = None  # (rows in use, vocab): next-token logits
        self.batch: Optional[Tuple[float, float, Optional[ReferenceNoise]]] = None
        # (prefill_chunk) prompts not all in the cache, FIFO
        self.prefilling: List[EngineSequence] = []
        self.sampled: Optional[torch.Tensor] = None  # the tokens of sample(), for advance()
        self.steps = 0
        if compiled_step is not None:
            cache.mark_static()  # a captured graph writes it in place

    # ------------------------------------------------------------------ adding sequences
    @torch.inference_mode()
    def add_batch(self, sequences: List[EngineSequence], noise: Optional[ReferenceNoise] = None,
                  all_logits: bool = False) -> torch.Tensor:
        """Prefill sequences together into slots 0, 1, ... of an empty engine, left-padded to
        the longest, sharing the first sequence's temperature and top_p and the batch's
        random draws `noise` (the library's calls). Returns the prefill's logits: every
        position's with `all_logits`, else each row's last (bsz, 1, vocab)."""
        if any(self.slots):
            raise RuntimeError("add_batch needs an empty engine")
        lens = [len(s.prompt) for s in sequences]
        longest = max(lens)
        tokens = torch.zeros((len(sequences), longest), dtype=torch.long, device=self.device)
        for row, seq in enumerate(sequences):
            tokens[row, longest - lens[row]:] = torch.tensor(seq.prompt, dtype=torch.long,
                                                            device=self.device)
            seq.slot, seq.start, seq.position = row, longest - lens[row], longest
            seq.prefilled = len(seq.prompt)
            self.slots[row] = seq
            if seq.limit == 0:
                seq.finish_reason = "length"
        pads = None
        if min(lens) != longest:
            self.starts[: len(sequences)] = torch.tensor([s.start for s in sequences])
            pads = self.starts[: len(sequences)]
        self.positions[: len(sequences)] = longest
        self.occupied[: len(sequences)] = 1
        logits = self.model.forward(tokens, 0, self.cache, pads, last_logits_only=not all_logits)
        self.logits = logits[:, -1]
        first = sequences[0]
        self.batch = (first.temperature, first.top_p, noise)
        return logits

    @torch.inference_mode()
    def add(self, seq: EngineSequence, cached: int = 0) -> int:
        """Put a sequence in the lowest free slot, while the others keep their places, and
        prefill it: alone, now (it joins the batch at the next step), or with prefill_chunk
        over the next steps. Returns its slot. `cached`: how many first tokens of its prompt
        the slot's cache row already holds (a conversation's earlier turns); with a prefix
        cache, the row is filled from it instead. Only the rest of the prompt is prefilled."""
        if not 0 <= cached < len(seq.prompt):
            raise ValueError(f"cached must be 0 .. len(prompt) - 1 = {len(seq.prompt) - 1} (the "
                             f"last prompt token gives the first logits), got {cached}")
        slot = self.slots.index(None)
        seq.slot, seq.start = slot, 0
        self.slots[slot] = seq
        if seq.limit == 0:
            seq.finish_reason = "length"
        if self.prefix_cache is not None and not cached:
            cached = self.prefix_cache.load(seq.prompt, self.cache, slot)
        if self.prefill_chunk:
            seq.position = seq.prefilled = cached  # (its first chunk's slot; not yet advancing)
            self.positions[slot], self.starts[slot], self.occupied[slot] = cached, 0, 0
            if not seq.finished:
                self.prefilling.append(seq)
            return slot
        # the row holds `cached` tokens until the prefill is done (if it fails, a release
        # offers the prefix cache only those)
        seq.position = seq.prefilled = cached
        tokens = torch.tensor([seq.prompt[cached:]], dtype=torch.long, device=self.device)
        row = self.cache.view(slice(slot, slot + 1))
        last = self.model.forward(tokens, cached, row, None, last_logits_only=True)[:, -1]
        seq.position = seq.prefilled = len(seq.prompt)
        self._remember(seq)
        rows = self._rows_in_use()
        self._grow_logits(rows, last)
        self.logits[slot] = last[0]
        self.positions[slot], self.starts[slot], self.occupied[slot] = seq.position, 0, 1
        return slot

    def _remember(self, seq: EngineSequence) -> None:
        """Offer the tokens in a sequence's cache row to the prefix cache: its prompt once
        prefilled, and what it generated when it leaves (the next turn of a chat starts so)."""
        if self.prefix_cache is not None and seq.start == 0:
            # the tokens written to the row: every one the model ran on (not a last sampled
            # token, nor EOS)
            self.prefix_cache.store((seq.prompt + seq.tokens)[: seq.position], self.cache,
                                    seq.slot)

    def _grow_logits(self, rows: int, like: torch.Tensor) -> None:
        if self.logits is None or self.logits.shape[0] < rows:
            grown = like.new_zeros((rows, like.shape[-1]))
            if self.logits is not None:
                grown[: self.logits.shape[0]] = self.logits
            self.logits = grown

    @torch.inference_mode()
    def release(self, seq: EngineSequence) -> None:
        """Free a sequence's slot (finished or cancelled); the slot is reused by the next
        sequence added, whose prefill overwrites its cache."""
        if seq.slot >= 0 and self.slots[seq.slot] is seq:
            self._remember(seq)
            self.slots[seq.slot] = None
            self._done_prefilling(seq)
            self.positions[seq.slot], self.starts[seq.slot], self.occupied[seq.slot] = 0, 0, 0
            seq.slot = -1

    @property
    def sequences(self) -> List[EngineSequence]:
        return [seq for seq in self.slots if seq is not None]

    @property
    def free_slots(self) -> int:
        return self.slots.count(None)

    def _rows_in_use(self, sequences: Optional[List[EngineSequence]] = None) -> int:
        """Rows the step computes: up to the highest slot of `sequences` (default: every
        occupied slot; all slots with a compiled step, whose shapes stay fixed). Slots below
        it without one of them are computed too, and ignored."""
        if self.compiled_step is not None:
            return len(self.slots)
        if sequences is None:
            sequences = self.sequences
        return max((seq.slot for seq in sequences), default=-1) + 1

    # ------------------------------------------------------------------ one decode step
    @torch.inference_mode()
    def step(self) -> List[EngineSequence]:
        """Sample a token for every decoding slot, apply it (EOS, limits, stop strings), then
        run the model on the new tokens of the sequences still going, and on the next chunks
        of prompts being prefilled: sample() then advance(). Returns the sequences that
        sampled (finished ones included); with release_finished their slots are freed."""
        sequences = self.sample()
        self.advance()
        return sequences

    @torch.inference_mode()
    def sample(self) -> List[EngineSequence]:
        """A step's first half: every decoding slot's next token, taken by its sequence. Its
        tokens are known from here on (a server sends them before the model runs)."""
        everyone = self.sequences
        sequences = [seq for seq in everyone if seq.decoding]
        self.sampled = None
        if sequences:
            rows = self._rows_in_use(sequences)
            logits = self.logits[:rows]
            constrain_logits(logits, sequences)  # penalties, bias, grammar masks: their rows
            self.sampled = self._sample(logits, sequences)  # (rows,), on the device
            take_constrained(self.sampled, sequences)  # may swap a token for a closing one
            self._accept(self.sampled, logits, sequences)
            self.steps += 1
        if self.release_finished:
            for seq in everyone:
                if seq.finished:
                    self.release(seq)
        return sequences

    @torch.inference_mode()
    def advance(self) -> None:
        """A step's second half: the model on the sampled tokens of the sequences still going
        and on the next prompt chunks, for the next step's logits."""
        tokens, self.sampled = self.sampled, None
        chunks = self._chunks()
        decoding = [seq for seq in self.sequences if seq.decoding]
        if chunks:
            self._forward_mixed(tokens, decoding, chunks)
        elif any(not seq.finished for seq in decoding):
            rows = self._rows_in_use(decoding)
            self._forward(tokens[:rows], rows)

    def _accept(self, tokens: torch.Tensor, logits: torch.Tensor,
                sequences: List[EngineSequence]) -> None:
        want_logprobs = any(s.logprobs or s.top_logprobs for s in sequences)
        if want_logprobs:
            logp = torch.log_softmax(logits, dim=-1)
            chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
            k = max(s.top_logprobs for s in sequences)
            top = logp.topk(k, dim=-1) if k else None
            top_ids, top_values = (top.indices.tolist(), top.values.tolist()) if k else ((), ())
        host_tokens = tokens.tolist()  # the step's one host sync: stop checks need the tokens
        for seq in sequences:
            i = seq.slot
            alternatives = (list(zip(top_ids[i], top_values[i]))[: seq.top_logprobs]
                            if seq.top_logprobs else None)
            seq.accept(host_tokens[i], self.stop_ids, chosen[i] if want_logprobs else 0.0,
                       alternatives)

    def _sample(self, logits: torch.Tensor, sequences: List[EngineSequence]) -> torch.Tensor:
        if self.batch is not None:  # a library call: one temperature, the batch's draws
            temperature, top_p, noise = self.batch
            return sample(logits, temperature, top_p,
                          noise.for_step(self.steps) if noise is not None else None)
        rows = logits.shape[0]
        if all(s.temperature == 0 for s in sequences):
            return torch.argmax(logits, dim=-1)
        temperature = torch.zeros(rows, device=self.device)
        top_p = torch.ones(rows, device=self.device)
        noise = torch.ones_like(logits)
        for seq in sequences:
            if seq.temperature > 0:
                temperature[seq.slot], top_p[seq.slot] = seq.temperature, seq.top_p
                noise[seq.slot] = (seq.noise.draw() if seq.noise is not None else
                                   torch.empty_like(noise[seq.slot]).exponential_(1))
        return sample(logits, temperature, top_p, noise)

    def _forward(self, tokens: torch.Tensor, rows: int) -> None:
        """The model on each row's new token, written at that row's next cache slot."""
        sequences = self.sequences
        host_positions = {seq.position for seq in sequences}
        padded = any(seq.start for seq in sequences)
        starts = self.starts[:rows] if padded else None
        uniform = len(sequences) == rows and len(host_positions) == 1
        compiled = self.step_choice is not None and self.step_choice.next()
        began = time.perf_counter()
        if compiled:
            positions = self.positions[:1] if uniform else self.positions[:rows]
            logits = self.compiled_step(tokens[:, None], positions, self.cache, starts)
        elif uniform:  # every row at the same slot: the plain step, reading a prefix
            logits = self.model.forward(tokens[:, None], host_positions.pop(), self.cache,
                                        starts, last_logits_only=True)
        else:  # rows at their own slots, reading up to the furthest one
            kv_len = max(host_positions) + 1
            logits = self.model.forward(tokens[:, None], self.positions[:rows],
                                        self.cache.view(slice(0, rows), kv_len), starts,
                                        last_logits_only=True)
        self.logits = logits[:, -1]
        if self.step_choice is not None:
            self.step_choice.took(time.perf_counter() - began)
        self.positions[:rows] += self.occupied[:rows]
        for seq in sequences:
            seq.position += 1

    def _done_prefilling(self, seq: EngineSequence) -> None:
        # by identity: sequences are dataclasses, whose == compares their fields
        self.prefilling = [other for other in self.prefilling if other is not seq]

    def _chunks(self) -> List[Tuple[EngineSequence, int, int]]:
        """This step's prompt chunks (sequence, first slot, tokens): the prompts waiting, in
        the order they came, up to prefill_chunk tokens in all."""
        chunks, budget = [], self.prefill_chunk
        for seq in self.prefilling:
            count = min(len(seq.prompt) - seq.prefilled, budget)
            if count <= 0:
                break
            chunks.append((seq, seq.prefilled, count))
            budget -= count
        return chunks

    def _forward_mixed(self, tokens: Optional[torch.Tensor], decoding: List[EngineSequence],
                       chunks: List[Tuple[EngineSequence, int, int]]) -> None:
        """One forward over the decoding rows' new tokens and the prompt chunks
        (cache.Segments): the decode rows get their next logits, and a prompt whose last
        chunk this is gets its first and starts decoding at the next step."""
        rows = self._rows_in_use(decoding)
        # the slots rows 0 .. rows - 1 read up to (see Segments): a decoding row's next one, a
        # prefilling one's next chunk's first (its position), a free one's slot 0
        kv_len = max((seq.position for seq in self.sequences if seq.slot < rows), default=0) + 1
        prompts = [torch.tensor(seq.prompt[start: start + count], dtype=torch.long,
                                device=self.device) for seq, start, count in chunks]
        flat = torch.cat(([tokens[:rows]] if rows else []) + prompts)
        segments = Segments(self.positions[:rows],
                            [(seq.slot, start, count) for seq, start, count in chunks],
                            kv_len)
        logits = self.model.forward_segments(flat, segments, self.cache)
        self._grow_logits(len(self.slots), logits)
        if rows:
            self.logits[:rows] = logits[:rows]
            self.positions[:rows] += self.occupied[:rows]
            for seq in decoding:
                seq.position += 1
        for i, (seq, start, count) in enumerate(chunks):
            seq.prefilled = start + count
            self.positions[seq.slot] = seq.position = seq.prefilled
            if seq.decoding:
                self.logits[seq.slot] = logits[rows + i]
                self.occupied[seq.slot] = 1
                self._done_prefilling(seq)
                self._remember(seq)
