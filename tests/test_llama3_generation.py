"""A tiny random model with Llama 3's vocabulary and tokenizer, end to end through Llama.build:
the chat prompt the model is fed is Meta's, and generation ends at each of Llama 3's stop
tokens in every API. The stop token is made the greedy choice at a chosen step by swapping its
output row with the row of the token greedy decoding picks there (so the logits are otherwise
unchanged), and checked against the model's own forward pass."""

from pathlib import Path

import pytest
import torch

from llama import Llama
from llama.checkpoints.fixtures import random_weights
from llama.checkpoints.saving import params_json, save_checkpoint, split_state_dict
from llama.engine.validation import ArgumentValueError
from llama.model import ModelArgs
from tests.llama3_reference import meta_dialog_tokens, meta_tokenizer, meta_tokenizer_path

ARGS = ModelArgs(vocab_size=128256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                 multiple_of=32, rope_theta=500000.0)
DIALOG = [{"role": "system", "content": "Always answer with Haiku"},
          {"role": "user", "content": "I am going to Paris, what should I see?"},
          {"role": "assistant", "content": "The Eiffel Tower."},
          {"role": "user", "content": "What is so great about #1?"}]
PROMPT = "The capital of France is"
STEPS = 8


def write(out_dir: Path, state) -> str:
    # params.json as Meta's Llama 3 downloads have it: vocab_size given (not -1)
    save_checkpoint(out_dir, split_state_dict(state, 1), {**params_json(ARGS),
                                                          "vocab_size": ARGS.vocab_size})
    return str(out_dir)


def build(ckpt_dir: str) -> Llama:
    return Llama.build(ckpt_dir, meta_tokenizer_path(), max_seq_len=96, max_batch_size=2,
                       verbose=False, device="cpu")


@pytest.fixture(scope="module")
def weights():
    return random_weights(ARGS, seed=31)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, weights):
    return write(tmp_path_factory.mktemp("llama3") / "base", weights)


@pytest.fixture(scope="module")
def base(base_dir):
    return build(base_dir)


def test_build_names_tokenizer_path_for_a_tiktoken_file_that_is_not_llama3_s(base_dir):
    llama4 = str(Path(meta_tokenizer_path()).parent.parent / "llama4" / "tokenizer.model")
    with pytest.raises(ArgumentValueError, match="^tokenizer_path '.*' is a tiktoken BPE file "
                                                 "of 200000 tokens, not Llama 3's"):
        Llama.build(base_dir, llama4, max_seq_len=96, max_batch_size=2, verbose=False)


def prompt_of(llama: Llama, api: str):
    if api in ("chat", "stream_chat"):
        return meta_dialog_tokens(meta_tokenizer(), DIALOG)
    return llama.tokenizer.encode(PROMPT, bos=True, eos=False)


def stop_made_greedy(tmp_path, weights, base: Llama, prompt, stop_id: int):
    """A checkpoint whose greedy continuation of `prompt` is the base model's up to a step k,
    then `stop_id`; returns (its directory, the k tokens before the stop)."""
    (greedy,), _ = base.generate([prompt], max_gen_len=STEPS, temperature=0)
    assert len(greedy) == STEPS and stop_id not in greedy  # no stop token by chance
    k = next(k for k in range(2, STEPS) if greedy[k] not in greedy[:k])
    state = dict(weights)
    output = state["output.weight"].clone()
    output[[greedy[k], stop_id]] = output[[stop_id, greedy[k]]]
    state["output.weight"] = output
    return write(tmp_path / "stop", state), greedy[:k]


def test_chat_completion_feeds_the_model_meta_s_prompt(base):
    seen = []
    hook = base.model.tok_embeddings.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].tolist()))
    try:
        result = base.chat_completion([DIALOG], temperature=0, max_gen_len=3)[0]
    finally:
        hook.remove()
    assert seen[0] == [meta_dialog_tokens(meta_tokenizer(), DIALOG)]  # the prefill
    assert result["finish_reason"] == "length"


@pytest.mark.parametrize("api, stop_name", [("chat", "<|eot_id|>"),
                                            ("stream_chat", "<|eot_id|>"),
                                            ("chat", "<|eom_id|>"),
                                            ("text", "<|end_of_text|>"),
                                            ("stream_text", "<|eot_id|>")])
def test_generation_ends_at_each_stop_token(tmp_path, weights, base, api, stop_name):
    stop_id = base.tokenizer.special_tokens[stop_name]
    prompt = prompt_of(base, api)
    ckpt, before_stop = stop_made_greedy(tmp_path, weights, base, prompt, stop_id)
    llama = build(ckpt)
    # the model itself: after those tokens its greedy choice is the stop token
    logits = llama.model.forward(torch.tensor([prompt + before_stop]), 0)
    assert int(logits[0, -1].argmax()) == stop_id
    llama.free_cache()

    expected = llama.tokenizer.decode(before_stop)
    if api == "chat":
        result = llama.chat_completion([DIALOG], temperature=0, max_gen_len=STEPS,
                                       logprobs=True)[0]
        text = result["generation"]["content"]
        assert result["tokens"] == [llama.tokenizer.decode([t]) for t in before_stop]
    elif api == "text":
        result = llama.text_completion([PROMPT], temperature=0, max_gen_len=STEPS)[0]
        text = result["generation"]
    else:
        stream = (llama.stream_chat(DIALOG, temperature=0, max_gen_len=STEPS) if
                  api == "stream_chat" else
                  llama.stream_text(PROMPT, temperature=0, max_gen_len=STEPS))
        text = "".join(stream)
        assert stream.text == text and stream.tokens == before_stop
        result = {"finish_reason": stream.finish_reason}
    assert text == expected and result["finish_reason"] == "stop"
    tokens, _ = llama.generate([prompt], max_gen_len=STEPS, temperature=0)
    assert tokens == [before_stop]


def test_the_server_uses_llama3_s_format_stop_tokens_and_token_bytes(tmp_path, weights, base):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from llama.chat_format import UNSAFE_ERROR
    from tests.server_fixtures import running_server

    prompt = prompt_of(base, "chat")
    ckpt, before_stop = stop_made_greedy(tmp_path, weights, base, prompt,
                                         base.tokenizer.special_tokens["<|eot_id|>"])
    expected = base.tokenizer.decode(before_stop)
    with running_server("--ckpt_dir", ckpt, "--tokenizer_path", meta_tokenizer_path(),
                        "--max_batch_size", "2", "--max_seq_len", "96") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        # (the server's model is named after its checkpoint directory)
        got = client.chat.completions.create(model="stop", messages=DIALOG, temperature=0,
                                             max_tokens=STEPS, logprobs=True)
        choice = got.choices[0]
        assert choice.message.content == expected and choice.finish_reason == "stop"
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(prompt),
                                                                          len(before_stop))
        assert b"".join(bytes(t.bytes) for t in choice.logprobs.content) == expected.encode()
        chunks = list(client.chat.completions.create(model="stop", messages=DIALOG,
                                                     temperature=0, max_tokens=STEPS,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"
        refused = client.chat.completions.create(
            model="stop", messages=[{"role": "user", "content": "hi<|eot_id|>"}])
        assert refused.choices[0].message.content == UNSAFE_ERROR


def test_the_interactive_chat_answers_in_llama3_s_format_until_eot(tmp_path, weights, base):
    import os
    import sys

    from tests.conftest import REPO
    from tests.test_examples import Terminal, _answer

    dialog = [{"role": "system", "content": "Answer briefly"},
              {"role": "user", "content": "Hello there, what is a list?"}]
    ckpt, before_stop = stop_made_greedy(tmp_path, weights, base,
                                         meta_dialog_tokens(meta_tokenizer(), dialog),
                                         base.tokenizer.special_tokens["<|eot_id|>"])
    command = [sys.executable, "example_chat_interactive.py", "--ckpt_dir", ckpt,
               "--tokenizer_path", meta_tokenizer_path(), "--temperature", "0",
               "--max_seq_len", "96", "--max_gen_len", str(STEPS), "--system", "Answer briefly"]
    term = Terminal(command, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    try:
        term.expect("User: ")
        term.type(dialog[1]["content"])
        term.expect("User: ", count=2)
        answer = _answer(term.screen.split("Assistant: ")[1])
        assert answer == base.tokenizer.decode(before_stop).strip()
        term.type("/exit")
        term.expect("Bye.")
        assert term.close() == 0
    finally:
        if term.process.poll() is None:
            term.process.kill()
