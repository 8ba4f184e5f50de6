"""The server's answers to clients' mistakes, its checks of who may ask, the OpenAI wire format
of completions, its command line, and what it tells operators (issue #25, points 6-12),
through real HTTP."""

import json
import re
import socket

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from llama.server.http_guard import default_allowed_hosts, host_name  # noqa: E402
from tests.conftest import run_entry_points  # noqa: E402
from tests.server_fixtures import read_log, refused_by_the_parser, running_server  # noqa: E402

PROMPT = "A list is"


@pytest.fixture(scope="module")
def server():
    with running_server("--max_batch_size", "2") as url:
        yield url


def _post(url, path, body=None):
    # json.dumps writes a lone surrogate as the escape "\ud800", as a client's JSON may
    return httpx.post(url + path, content=json.dumps(body), timeout=60,
                      headers={"Content-Type": "application/json"})


def test_client_mistakes_get_openai_errors_not_500(server):
    lone = _post(server, "/v1/completions", {"prompt": "caf\ud800", "max_tokens": 2})
    assert lone.status_code == 400 and lone.json()["error"]["param"] == "prompt"
    chat = _post(server, "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "\udce9"}]})
    assert chat.status_code == 400
    assert chat.json()["error"]["param"] == "messages[0].content"
    stop = _post(server, "/v1/completions", {"prompt": "x", "stop": ["\ud800"]})
    assert stop.status_code == 400 and stop.json()["error"]["param"] == "stop"
    nested = httpx.post(server + "/v1/completions", content=b"[" * 100000 + b"]" * 100000,
                        headers={"Content-Type": "application/json"}, timeout=60)
    assert nested.status_code == 400 and "nested" in nested.json()["error"]["message"]
    for response, status in ((httpx.get(server + "/v2/nothing"), 404),
                             (httpx.get(server + "/v1/completions"), 405)):
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_errors_name_one_of_several_prompts_as_people_count(server):
    too_long = "word " * 600  # over the demo model's 512-token context
    several = _post(server, "/v1/completions", {"prompt": ["A list is", too_long]})
    assert several.status_code == 400
    assert re.match(r"prompt 2 has \d+ tokens; ", several.json()["error"]["message"]), \
        several.text
    alone = _post(server, "/v1/completions", {"prompt": too_long})
    assert re.match(r"the prompt has \d+ tokens; ", alone.json()["error"]["message"])
    lone = _post(server, "/v1/completions", {"prompt": ["A list is", "caf\ud800"]})
    assert lone.json()["error"]["message"].startswith("prompt 2 holds '\\ud800' at character 3")
    # a request's messages are named as the JSON field (from 0), as the other errors name them
    order = _post(server, "/v1/chat/completions",
                  {"messages": [{"role": "user", "content": "a"},
                                {"role": "user", "content": "b"}]})
    assert order.status_code == 400
    assert order.json()["error"]["message"].startswith(
        "messages[1]: expected role 'assistant', got 'user'"), order.text


def test_a_tiny_temperature_is_greedy(server):
    def text(temperature):
        return _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12,
                                                 "temperature": temperature,
                                                 "seed": 5}).json()["choices"][0]["text"]
    greedy = text(0)
    assert text(1e-40) == greedy and text(1e-300) == greedy


def test_only_json_bodies_and_local_hosts_are_served(server):
    plain = httpx.post(server + "/v1/completions", timeout=30,
                       content=b'{"prompt": "x", "max_tokens": 2}',
                       headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415, plain.text  # what any web page may post unasked
    rebound = httpx.get(server + "/v1/models", headers={"Host": "evil.example:8000"})
    assert rebound.status_code == 400 and "--allowed_hosts" in rebound.text
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert httpx.get(server + "/health", headers={"Host": host}).status_code == 200


def test_host_names_and_the_default_allowed_hosts():
    assert [host_name(h) for h in ("a.b:80", "127.0.0.1", "[::1]:9", "::1", "X.COM")] == \
        ["a.b", "127.0.0.1", "::1", "::1", "x.com"]
    assert "localhost" in default_allowed_hosts("127.0.0.1")
    assert default_allowed_hosts("0.0.0.0") is None


def test_api_keys_compare_exactly_with_any_bearer_case():
    with running_server("--max_batch_size", "1", env={"LLAMA_API_KEY": "sesame"}) as url:
        def models(authorization):
            return httpx.get(url + "/v1/models", headers={"Authorization": authorization})
        assert models("Bearer sesame").status_code == 200
        assert models("bearer sesame").status_code == 200
        assert models("BEARER  sesame").status_code == 200
        for wrong in ("Bearer sesam", "Bearer sesame2", "Basic sesame", "sesame", ""):
            assert models(wrong).status_code == 401, wrong
        assert httpx.get(url + "/metrics").status_code == 200  # no secrets there


def test_an_empty_api_key_is_refused_at_start(monkeypatch, capsys):
    monkeypatch.setenv("LLAMA_API_KEY", "")
    status, stderr = refused_by_the_parser([], capsys)
    assert status == 2 and "LLAMA_API_KEY is empty" in stderr


def test_completions_keep_the_space_their_text_starts_with(server):
    got = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8,
                                            "temperature": 0, "logprobs": 1}).json()
    choice = choice0 = got["choices"][0]
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
    assert choice["logprobs"]["text_offset"][0] == 0
    assert choice["text"].startswith(" ")  # "A list is" + " a ...": words stay apart
    streamed = httpx.post(server + "/v1/completions", timeout=60,
                          json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                "stream": True}).text
    pieces = re.findall(r'"text": "((?:[^"\\]|\\.)*)"', streamed)
    assert "".join(pieces) == choice0["text"]
    echoed = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8,
                                               "temperature": 0, "echo": True}).json()
    assert echoed["choices"][0]["text"] == PROMPT + choice0["text"]


MISTAKES = [
    (["--ckpt_dir", "nope"], 1, "--ckpt_dir 'nope' does not exist"),
    (["--port", "99999"], 2, "--port must be between 0 and 65535"),
    (["--dtype", "float64"], 1, "--dtype 'float64' is not supported"),
    (["--max_seq_len", "0"], 2, "--max_seq_len must be at least 2"),
]


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    """(status, stdout, stderr) of `python -m llama.server` on each mistaken command line, all
    run in one process (tests/entry_points.py); under "taken port", on a port this process
    listens on meanwhile."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = [args for args, _, _ in MISTAKES] + [["--port", str(taken.getsockname()[1])]]
        results = run_entry_points([["-m", "llama.server"] + args for args in cases],
                                   tmp_path_factory.mktemp("mistakes"))
    named = {tuple(args): result for (args, _, _), result in zip(MISTAKES, results)}
    return {**named, "taken port": results[-1]}


@pytest.mark.parametrize("args, status, says", MISTAKES)
def test_command_line_mistakes_are_one_line(args, status, says, mistakes):
    got, _, stderr = mistakes[tuple(args)]
    assert got == status and says in stderr, stderr
    assert "Traceback" not in stderr


def test_a_taken_port_is_said_before_loading(mistakes):
    status, _, stderr = mistakes["taken port"]
    assert status == 1 and "Address already in use" in stderr
    assert "Serving" not in stderr and "Loaded" not in stderr


def _metric(text, name):
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_access_log_and_metrics_count_each_request(server):
    before = httpx.get(server + "/metrics").text
    got = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5,
                                            "temperature": 0}).json()
    _post(server, "/v1/completions", {"prompt": 5})  # a 400
    after = httpx.get(server + "/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    ok = 'llama_requests_total{route="/v1/completions",status="200"}'
    bad = 'llama_requests_total{route="/v1/completions",status="400"}'
    assert _metric(after.text, ok) == _metric(before, ok) + 1
    assert _metric(after.text, bad) == _metric(before, bad) + 1
    for name, grown in (("llama_completion_tokens_total", 5),
                        ("llama_prompt_tokens_total", got["usage"]["prompt_tokens"]),
                        ("llama_time_to_first_token_seconds_count", 1),
                        ("llama_inter_token_seconds_count", 4)):
        assert _metric(after.text, name) == _metric(before, name) + grown, name
    assert _metric(after.text, "llama_slots") == 2
    assert _metric(after.text, 'llama_request_duration_seconds_bucket{le="+Inf"}') >= 2
    line = [line for line in read_log(server.process).splitlines()
            if line.startswith(f"request {got['id']} ")]
    assert len(line) == 1, read_log(server.process)[-2000:]
    assert re.fullmatch(rf"request {got['id']} POST /v1/completions 200 "
                        rf"prompt_tokens={got['usage']['prompt_tokens']} completion_tokens=5 "
                        r"ttft=\d+\.\d{3}s total=\d+\.\d{3}s", line[0]), line[0]
