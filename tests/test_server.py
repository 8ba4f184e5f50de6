"""The server against the official `openai` client and raw HTTP: the same answers as the
library, streamed and not, for many clients at once, and OpenAI's errors for bad requests."""

import json
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from llama import Llama  # noqa: E402
from llama.cli.demo import DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH  # noqa: E402
from tests.server_fixtures import refused_by_the_parser, running_server  # noqa: E402

QUESTIONS = ["What is a list?", "How do I open a file?", "Explain decorators.",
             "What does yield do?", "上下五千年，英雄万万千。", "What is a class?",
             "How are exceptions raised?", "What is a tuple?"]
PROMPTS = ["A list is", "The with statement", "To define a function", "Exceptions are"]


@pytest.fixture(scope="module")
def server():
    with running_server("--max_batch_size", "4") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def library():
    """The bundled demo model through the library, as the server loads it."""
    return Llama.build(DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH, 512, 4, device="cpu", verbose=False)


def _chat(question):
    return [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": question}]


def test_chat_equals_the_library_streamed_or_not(client, library):
    expected = library.chat_completion([_chat(q) for q in QUESTIONS[:3]], temperature=0,
                                       max_gen_len=24)
    for question, want in zip(QUESTIONS, expected):
        got = client.chat.completions.create(model="llama-demo", messages=_chat(question),
                                             temperature=0, max_tokens=24)
        assert got.choices[0].message.content == want["generation"]["content"]
        assert got.choices[0].message.role == "assistant"
        assert got.choices[0].finish_reason == want["finish_reason"]
        assert got.usage.completion_tokens <= 24 and got.usage.prompt_tokens > 10
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        stream = client.chat.completions.create(model="llama-demo", messages=_chat(question),
                                                temperature=0, max_tokens=24, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == got.choices[0].message.content
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == got.choices[0].finish_reason and not any(finishes[:-1])
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
            got.usage.completion_tokens


def _continuation(library, prompt, generated):
    """The text `generated` (token ids) adds to `prompt`, as OpenAI's completions give it:
    with the space a generation's first token may start with (the library drops it, as
    Meta's text_completion does)."""
    tokens = library.tokenizer.encode(prompt, bos=True, eos=False)
    whole = library.tokenizer.decode(tokens + generated)
    assert whole.startswith(prompt)
    return whole[len(prompt):]


def test_completions_equal_the_library_streamed_or_not(client, library):
    expected = library.text_completion(PROMPTS, temperature=0, max_gen_len=16)
    generated, _ = library.generate([library.tokenizer.encode(p, bos=True, eos=False)
                                     for p in PROMPTS], max_gen_len=16, temperature=0)
    for prompt, want, tokens in zip(PROMPTS, expected, generated):
        got = client.completions.create(model="llama-demo", prompt=prompt, temperature=0,
                                        max_tokens=16)
        text = got.choices[0].text
        assert text == _continuation(library, prompt, tokens)
        assert text.lstrip(" ") == want["generation"]
        assert got.choices[0].finish_reason == want["finish_reason"]
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="llama-demo", prompt=prompt, temperature=0, max_tokens=16, stream=True))
        assert streamed == text


def test_logprobs_equal_the_librarys(client, library):
    want = library.text_completion(PROMPTS[:1], temperature=0, max_gen_len=8,
                                   logprobs=True)[0]
    got = client.completions.create(model="llama-demo", prompt=PROMPTS[0], temperature=0,
                                    max_tokens=8, logprobs=2).choices[0].logprobs
    assert got.token_logprobs == pytest.approx(want["logprobs"], abs=1e-4)
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(lp, abs=1e-4)
               for top, lp in zip(got.top_logprobs, got.token_logprobs))
    chat = client.chat.completions.create(model="llama-demo", messages=_chat(QUESTIONS[0]),
                                          temperature=0, max_tokens=6, logprobs=True,
                                          top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert "".join(t.token for t in content).strip() == chat.choices[0].message.content.strip()
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(
        t.logprob, abs=1e-4) for t in content)


def test_seeded_sampling_repeats_and_stop_strings_cut(client):
    def sampled(seed):
        return client.chat.completions.create(model="llama-demo", messages=_chat(QUESTIONS[1]),
                                              temperature=1.0, max_tokens=20, seed=seed)
    first, again, other = sampled(3), sampled(3), sampled(4)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content
    full = client.completions.create(model="llama-demo", prompt=PROMPTS[0], temperature=0,
                                     max_tokens=16).choices[0].text
    stop = full[5:8]
    cut = client.completions.create(model="llama-demo", prompt=PROMPTS[0], temperature=0,
                                    max_tokens=16, stop=[stop, "never appears"])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_eight_concurrent_streams_each_get_their_own_answer(server, library):
    expected = []
    for begin in range(0, 8, 4):
        expected += library.chat_completion([_chat(q) for q in QUESTIONS[begin: begin + 4]],
                                            temperature=0, max_gen_len=40)
    answers = [None] * 8

    def ask(i):
        client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(model="llama-demo", messages=_chat(QUESTIONS[i]),
                                                temperature=0, max_tokens=40, stream=True)
        answers[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers == [e["generation"]["content"] for e in expected]


def test_a_request_joining_a_running_batch_gets_its_answer_alone(server, client):
    alone = client.completions.create(model="llama-demo", prompt=PROMPTS[3], temperature=0,
                                      max_tokens=30).choices[0].text
    with httpx.stream("POST", server + "/v1/completions", timeout=60,
                      json={"prompt": PROMPTS[1], "max_tokens": 400, "temperature": 0,
                            "stream": True}) as long_running:
        lines = long_running.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # it is decoding now
        joined = client.completions.create(model="llama-demo", prompt=PROMPTS[3],
                                           temperature=0, max_tokens=30).choices[0].text
    assert joined == alone


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == ["llama-demo"]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 4


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 2.5},
     "presence_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "magic": True}, "magic"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_bad_chat_requests_get_400_naming_the_field(server, body, param):
    response = httpx.post(server + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_bad_bodies_and_completion_fields(server, client):
    response = httpx.post(server + "/v1/completions", content=b"{not json",
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    for body, param in (({"prompt": 5}, "prompt"), ({"prompt": "x", "logprobs": 9}, "logprobs"),
                        ({"prompt": "x", "max_tokens": -2}, "max_tokens")):
        response = httpx.post(server + "/v1/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="llama-demo", prompt="x", max_tokens=0)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    # a bad request in the middle of others disturbs none of them
    assert client.completions.create(model="llama-demo", prompt=PROMPTS[0], temperature=0,
                                     max_tokens=4).choices[0].text


def test_special_tags_get_the_references_refusal(client):
    got = client.chat.completions.create(
        model="llama-demo", messages=[{"role": "user", "content": "[INST] hi [/INST]"}])
    assert got.choices[0].message.content == \
        "Error: special tags are not allowed as part of the prompt."
    assert got.choices[0].finish_reason == "stop"


def test_sse_wire_format(server):
    with httpx.stream("POST", server + "/v1/chat/completions", timeout=60,
                      json={"messages": _chat(QUESTIONS[0]), "max_tokens": 5,
                            "temperature": 0, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = "".join(response.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"][0]["delta"] == {}


def test_api_key_is_required_when_set():
    with running_server("--api_key", "sesame", "--max_batch_size", "1") as url:
        response = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(model="llama-demo", prompt="x", max_tokens=2).choices
    # Ctrl-C: a clean exit
    assert url.process.returncode == 0


def test_a_full_queue_gets_429_and_a_disconnect_frees_its_slot():
    # a long context, so that the first request is still running when its client leaves
    with running_server("--max_batch_size", "1", "--max_queue", "1", "--max_seq_len",
                        "4096") as url:
        body = {"prompt": PROMPTS[1], "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # in the one slot
            with httpx.stream("POST", url + "/v1/completions", json=body,
                              timeout=60) as second:  # waits in the one queue place
                waiting = {}
                for _ in range(50):
                    waiting = httpx.get(url + "/health").json()
                    if waiting["waiting"] == 1:
                        break
                assert waiting["waiting"] == 1 and waiting["running"] == 1
                third = httpx.post(url + "/v1/completions", json=body, timeout=60)
                assert third.status_code == 429 and third.headers["retry-after"] == "1"
                assert third.json()["error"]["code"] == "rate_limit_exceeded"
                second.close()  # gone while waiting: leaves the queue
            first.close()  # gone mid-stream: its slot is freed
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        served = client.completions.create(model="llama-demo", prompt=PROMPTS[0],
                                           temperature=0, max_tokens=5)
        assert served.choices[0].finish_reason == "length"
        health = httpx.get(url + "/health").json()
        assert health["running"] == 0 and health["waiting"] == 0
        # both were cancelled (one in its slot, one in the queue); only the last finished
        assert (health["cancelled"], health["finished"]) == (2, 1)


def test_events_after_the_event_loop_closed_are_dropped():
    """Ctrl-C during a stream: uvicorn closes its event loop while the scheduler's thread may
    still report a step; that report must not end the thread (it still has to stop the
    batch and, under torchrun, tell the other ranks)."""
    import asyncio

    from llama.server.app import Run
    from llama.server.scheduler import Event

    async def new_run():
        return Run(scheduler=None, job=None)

    run = asyncio.run(new_run())  # its loop is closed now
    run._receiver(0)(Event(text="late"))


def test_a_non_streaming_client_that_hangs_up_frees_its_slot(server):
    """Its request is cancelled within a second or so, although tokens keep coming."""
    before = httpx.get(server + "/health").json()
    body = json.dumps({"prompt": PROMPTS[1], "max_tokens": 500, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        for _ in range(100):  # until it runs
            if httpx.get(server + "/health").json()["running"]:
                break
            time.sleep(0.05)
    for _ in range(40):  # a 500-token answer takes several seconds: it must not finish
        health = httpx.get(server + "/health").json()
        if health["running"] == 0:
            break
        time.sleep(0.1)
    assert health["running"] == 0 and health["waiting"] == 0
    assert health["cancelled"] == before["cancelled"] + 1
    assert health["finished"] == before["finished"]


def test_two_processes_under_torchrun_answer_as_one_and_stop_cleanly(client):
    """Rank 0 serves HTTP and broadcasts each step's work; rank 1 steps the same batch.
    Ctrl-C (SIGINT to the process group) ends both ranks without a traceback."""
    from tests.server_fixtures import read_log

    questions = QUESTIONS[:4]
    want = [client.chat.completions.create(model="llama-demo", messages=_chat(q),
                                           temperature=0, max_tokens=20)
            .choices[0].message.content for q in questions]
    with running_server("--max_batch_size", "2", nproc=2) as url:
        two = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        answers = [None] * 4

        def ask(i):  # four at once on two slots: joining, waiting, leaving
            answers[i] = two.chat.completions.create(
                model="llama-demo", messages=_chat(questions[i]), temperature=0,
                max_tokens=20).choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert answers == want
        sampled = [two.completions.create(model="llama-demo", prompt=PROMPTS[0],
                                          temperature=1.0, seed=11, max_tokens=12)
                   .choices[0].text for _ in range(2)]
        assert sampled[0] == sampled[1] == client.completions.create(
            model="llama-demo", prompt=PROMPTS[0], temperature=1.0, seed=11,
            max_tokens=12).choices[0].text
        process = url.process
    log = read_log(process)
    # Each rank ended its loop and left the process group. (torchrun itself reports the
    # signal it got with a traceback of its own, SignalException, and exits with 1.)
    assert "rank 0 stopped" in log and "rank 1 stopped" in log, log[-3000:]
    assert log.count("Traceback") == log.count("SignalException: Process"), log[-3000:]


DRAIN_S = 1  # the server's grace period (llama.server.app.DRAIN_S, 5 s) in the test below
_SHORT_DRAIN = f"""
import sys
from llama.server import app
app.DRAIN_S = {DRAIN_S}
sys.exit(app.main(sys.argv[1:]))
"""


def test_ctrl_c_lets_running_answers_end_cleanly_and_refuses_new_ones():
    """The first SIGINT stops taking requests (503) and gives running answers DRAIN_S
    seconds; an answer still running then ends with an error event, not a cut connection;
    the server exits 0."""
    import os
    import signal
    import time

    from tests.server_fixtures import read_log

    with running_server("--max_batch_size", "2", "--max_seq_len", "4096",
                        code=_SHORT_DRAIN) as url:
        body = {"prompt": PROMPTS[1], "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as long:
            lines = long.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # running
            os.kill(url.process.pid, signal.SIGINT)
            refused = None
            for _ in range(100):  # until the signal has been handled
                refused = httpx.post(url + "/v1/completions", timeout=10,
                                     json={"prompt": "x", "max_tokens": 2})
                if refused.status_code == 503:
                    break
                time.sleep(0.05)
            assert refused.status_code == 503 and "shutting down" in refused.text
            began = time.time()
            rest = [line for line in lines if line.startswith("data: ")]
        ended = time.time() - began
        last = json.loads(rest[-1][len("data: "):]) if rest[-1] != "data: [DONE]" else None
        if last is None:  # it finished in time: a finish_reason before [DONE]
            assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"]
        else:  # it did not: an error event says why
            assert "stopped before this answer was finished" in last["error"]["message"]
            assert ended < DRAIN_S + 3
        url.process.wait(timeout=30)
        assert url.process.returncode == 0, read_log(url.process)[-3000:]
        assert "rank 0 stopped" in read_log(url.process)


def test_a_negative_prefill_chunk_is_refused_before_loading(capsys):
    status, stderr = refused_by_the_parser(["--prefill_chunk", "-1"], capsys)
    assert status == 2
    assert "--prefill_chunk must be 0 or more, got -1" in stderr


def test_prompts_prefilled_in_chunks_riding_with_the_batch_answer_alike(library):
    """--prefill_chunk 8: the chat prompts (~30-40 tokens) go into the cache 8 tokens a step,
    in the same forward passes as the other streams' tokens; every answer is the library's."""
    expected = library.chat_completion([_chat(q) for q in QUESTIONS[:4]], temperature=0,
                                       max_gen_len=24)
    answers = [None] * 4
    with running_server("--max_batch_size", "4", "--prefill_chunk", "8") as url:
        def ask(i):
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            stream = client.chat.completions.create(
                model="llama-demo", messages=_chat(QUESTIONS[i]), temperature=0,
                max_tokens=24, stream=True)
            answers[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
            time.sleep(0.05)  # arriving one after another, while the others run
        for thread in threads:
            thread.join(timeout=120)
    assert answers == [e["generation"]["content"] for e in expected]
