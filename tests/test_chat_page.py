"""The chat page at GET / in a real browser: Debian's chromium, headless, driven by selenium
through chromedriver. Each test types into the page as a user would, against a real server, and
compares what the page shows with the API's answer for the same conversation (temperature 0).

Skipped when selenium, chromium or chromedriver is missing, unless LLAMA_REQUIRE_BROWSER=1
(as .ci/run sets it): then every test here fails, saying what to install."""

import os
import shutil
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from tests.server_fixtures import running_server  # noqa: E402

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
MISSING = [name for name, found in (("selenium", webdriver), ("chromium", CHROMIUM),
                                    ("chromedriver", CHROMEDRIVER)) if not found]
HOW = ("apt-get install -y chromium chromium-driver (Debian's browser and its driver); "
       "pip install selenium")
REQUIRED = os.environ.get("LLAMA_REQUIRE_BROWSER") == "1"
if MISSING and not REQUIRED:
    pytest.skip(f"the chat page tests need a browser ({', '.join(MISSING)} missing): {HOW}",
                allow_module_level=True)

KEY = "sesame"
LONG = ""  # an empty Max tokens field: the answer may take what the context leaves


@pytest.fixture(scope="module", autouse=True)
def browser_present():
    if MISSING:  # only here with LLAMA_REQUIRE_BROWSER=1
        pytest.fail(f"LLAMA_REQUIRE_BROWSER=1, but this is missing: {', '.join(MISSING)}; "
                    f"{HOW}", pytrace=False)


@pytest.fixture(scope="module")
def server():
    # a long context, so that an answer runs long enough to be stopped by hand
    with running_server("--max_batch_size", "2", "--max_seq_len", "4096") as url:
        yield url


@pytest.fixture(scope="module")
def locked_server():
    """An API key, and a short context that a few exchanges outgrow."""
    with running_server("--max_batch_size", "1", "--max_seq_len", "256",
                        "--api_key", KEY) as url:
        yield url


@pytest.fixture(scope="module")
def demo_server():
    """The demo model with its own defaults: a 512-token context (the page's Max tokens 128)."""
    with running_server("--max_batch_size", "1") as url:
        yield url


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new",
                 "--no-sandbox",  # root (CI containers) cannot use chromium's sandbox
                 "--disable-dev-shm-usage", "--window-size=1000,750", "--no-first-run",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-extensions",
                 # any host but 127.0.0.1 fails to resolve: the page must need none
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    # an explicit chromedriver: selenium then never looks for (or downloads) one
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield browser
    browser.quit()


class Page:
    """The chat page as a user sees it: fields by id, Enter to send."""

    def __init__(self, driver, url, temperature="0", max_tokens="24"):
        self.driver, self.url = driver, url
        driver.get(url + "/")
        if temperature is not None:
            self.set("temperature", temperature)
        if max_tokens is not None:
            self.set("max_tokens", max_tokens)

    def field(self, name):
        return self.driver.find_element(By.ID, name)

    def set(self, name, value):
        self.field(name).clear()
        self.field(name).send_keys(value)

    def send(self, text):
        self.field("input").send_keys(text + Keys.ENTER)

    def busy(self):
        return self.field("stop").is_enabled()

    def wait(self, condition, timeout=60):
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
            lambda _: condition())

    def ask(self, text):
        """Send a message and wait for its answer to end; returns the answer shown."""
        self.send(text)
        self.wait(lambda: not self.busy())
        return self.answers()[-1]

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def messages(self):
        """[(kind, text)] of the conversation's boxes: user, assistant, error."""
        return [tuple(m) for m in self.js(
            "return [...document.querySelectorAll('#messages .message')].map(m => "
            "[m.classList[1], m.querySelector('.content').textContent])")]

    def answers(self):
        return [text for kind, text in self.messages() if kind == "assistant"]

    def record_lengths(self):
        """From now on, window.lengths gets the last answer's length at each change."""
        self.js("window.lengths = []; const log = document.getElementById('messages');"
                "new MutationObserver(() => { const all = log.querySelectorAll("
                "'.assistant .content'); if (all.length) window.lengths.push("
                "all[all.length - 1].textContent.length); }).observe(log, "
                "{childList: true, subtree: true, characterData: true});")

    def lengths(self):
        return self.js("return window.lengths")

    def wait_streaming(self, distinct=4):
        """Until the last answer has been shown at `distinct` lengths: it is streaming."""
        self.wait(lambda: len(set(self.lengths()) - {0}) >= distinct, timeout=30)
        assert self.busy()


def api(url, messages, max_tokens=24, key="unused"):
    """The API's answer (no leading blanks: the page does not show them)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    answer = client.chat.completions.create(model="llama-demo", messages=messages,
                                            temperature=0, max_tokens=max_tokens)
    return answer.choices[0].message.content.lstrip()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def health(url):
    return httpx.get(url + "/health").json()


def wait_freed(url, before):
    """/health once the slot is free again; it must count one more cancelled request."""
    deadline = time.time() + 10
    while (now := health(url))["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert now["running"] == 0 and now["waiting"] == 0
    assert now["cancelled"] == before["cancelled"] + 1
    assert now["finished"] == before["finished"]  # cancelled, not run to its end


def test_a_message_streams_the_apis_answer(driver, server):
    page = Page(driver, server, max_tokens="120")
    page.record_lengths()
    answer = page.ask("What is a list?")
    assert answer == api(server, [user("What is a list?")], 120) and answer
    assert page.messages() == [("user", "What is a list?"), ("assistant", answer)]
    lengths = page.lengths()  # shown piece by piece, each time longer
    assert len(set(lengths)) >= 5 and lengths == sorted(lengths), lengths
    assert page.js("return document.querySelector('.assistant .ending').textContent") == \
        "[cut at the length limit (Max tokens)]"
    assert page.field("model").text == "llama-demo"
    assert page.field("status").text == "" and page.field("send").is_enabled()
    loaded = page.js("return [location.href, ...performance.getEntriesByType('resource')"
                     ".map(r => r.name)]")  # the page and what it fetched: this server only
    assert all(u.startswith(server + "/") for u in loaded), loaded


def test_the_system_prompt_is_sent(driver, server):
    system, question = "你是一名C++开发专家", "用C++写一个快速排序"
    page = Page(driver, server)
    page.set("system", system)
    answer = page.ask(question)
    with_system = api(server, [{"role": "system", "content": system}, user(question)])
    assert with_system != api(server, [user(question)])  # so the comparison means something
    assert answer == with_system
    assert page.messages() == [("user", question), ("assistant", answer)]


def test_a_second_message_continues_the_conversation(driver, server):
    first, second = "How do I open a file?", "What does yield do?"
    page = Page(driver, server)
    page.ask(first)
    page.ask(second)
    earlier = api(server, [user(first)])
    continued = api(server, [user(first), assistant(earlier), user(second)])
    assert continued != api(server, [user(second)])
    assert page.answers() == [earlier, continued]


def test_stop_ends_a_long_answer_frees_its_slot_and_the_chat_goes_on(driver, server):
    page = Page(driver, server, max_tokens=LONG)
    before = health(server)
    page.record_lengths()
    page.send("Explain decorators.")
    page.wait_streaming()
    page.field("stop").click()
    page.wait(lambda: not page.busy(), timeout=10)
    wait_freed(server, before)
    stopped = page.answers()[-1]
    time.sleep(0.3)
    assert page.answers()[-1] == stopped and 0 < len(stopped) < 4000  # no longer growing
    assert page.field("status").text == "Stopped."
    assert page.js("return document.querySelector('.assistant .ending').textContent") == \
        "[stopped]"
    assert driver.switch_to.active_element == page.field("input")
    page.set("max_tokens", "24")
    # what came is kept as the answer, and the conversation goes on from it
    answer = page.ask("What is a class?")
    assert answer == api(server, [user("Explain decorators."), assistant(stopped),
                                  user("What is a class?")])


def test_reset_clears_the_conversation_and_stops_its_answer(driver, server):
    page = Page(driver, server)
    page.ask("What is a tuple?")
    page.set("max_tokens", LONG)
    before = health(server)
    page.record_lengths()
    page.send("How are exceptions raised?")
    page.wait_streaming()
    page.field("reset").click()
    assert page.messages() == [] and not page.busy()
    wait_freed(server, before)
    page.set("max_tokens", "24")
    answer = page.ask("What is a class?")
    fresh = api(server, [user("What is a class?")])
    assert answer == fresh and page.messages() == [("user", "What is a class?"),
                                                  ("assistant", fresh)]
    earlier = api(server, [user("What is a tuple?")])
    assert fresh != api(server, [user("What is a tuple?"), assistant(earlier),
                                 user("What is a class?")])


def test_the_keyboard_alone_writes_sends_and_stops(driver, server):
    page = Page(driver, server, temperature=None, max_tokens=None)
    assert driver.switch_to.active_element == page.field("input")  # ready to type on load
    page.set("max_tokens", LONG)
    page.field("input").send_keys("A list", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "in Python?")
    # Enter confirming a candidate of an input method (pinyin) sends nothing
    page.js("arguments[0].dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', "
            "keyCode: 229, isComposing: true, bubbles: true}))", page.field("input"))
    assert page.messages() == [] and not page.busy()
    page.record_lengths()
    page.field("input").send_keys(Keys.ENTER)
    page.wait_streaming()
    page.field("input").send_keys(Keys.ESCAPE)
    page.wait(lambda: not page.busy(), timeout=10)
    assert page.messages()[0] == ("user", "A list\nin Python?")
    assert page.field("status").text == "Stopped."


def test_an_error_is_shown_and_the_api_key_field_fixes_it(driver, locked_server):
    page = Page(driver, locked_server)
    page.send("What is a list?")
    page.wait(lambda: page.messages() and page.messages()[-1][0] == "error")
    [(_, error)] = page.messages()  # the question is not part of the conversation
    assert "a valid API key is needed" in error and "API key field" in error
    key_field = page.field("api_key")
    assert driver.switch_to.active_element == key_field  # the field to fill in
    assert key_field.get_attribute("aria-invalid") == "true"
    assert page.field("input").get_property("value") == "What is a list?"  # to send again
    key_field.send_keys(KEY + Keys.ENTER)  # Enter in any field sends the message
    page.wait(lambda: not page.busy() and page.answers())
    answer = api(locked_server, [user("What is a list?")], key=KEY)
    assert page.messages() == [("user", "What is a list?"), ("assistant", answer)]
    assert key_field.get_attribute("aria-invalid") is None
    page.wait(lambda: page.field("model").text == "llama-demo", timeout=5)


def test_a_conversation_outgrowing_the_context_drops_its_oldest_exchanges(driver,
                                                                          locked_server):
    questions = ["What is a list?", "How do I open a file?", "What is a tuple?"]
    page = Page(driver, locked_server, max_tokens="80")
    page.set("api_key", KEY)
    answers = [page.ask(q) for q in questions]
    dialog = []
    for question in questions[:2]:
        dialog += [user(question), assistant(api(locked_server, dialog + [user(question)],
                                                 80, KEY))]
    with pytest.raises(openai.BadRequestError) as caught:  # the whole dialog cannot be sent
        api(locked_server, dialog + [user(questions[2])], 80, KEY)
    assert caught.value.body["code"] == "context_length_exceeded"
    shortened = dialog[2:] + [user(questions[2])]
    assert answers == [dialog[1]["content"], dialog[3]["content"],
                       api(locked_server, shortened, 80, KEY)]
    dropped = page.js("return [...document.querySelectorAll('.dropped .content')]"
                      ".map(e => e.textContent)")
    assert dropped == [questions[0], answers[0]]
    assert "no longer fit" in page.field("messages").find_element(By.CLASS_NAME, "note").text
    # a message too long by itself: said so, and nothing more is dropped for it
    page.send("word " * 300)
    page.wait(lambda: page.messages()[-1][0] == "error")
    assert "Shorten the message" in page.messages()[-1][1]
    assert len(page.js("return document.querySelectorAll('.dropped')")) == 2
    assert [kind for kind, _ in page.messages()] == ["user", "assistant"] * 3 + ["error"]


def test_max_tokens_leaves_room_for_a_conversation(driver, locked_server):
    """Max tokens defaults to a quarter of the context the server reports (/v1/models'
    max_model_len), not 256 of a 256-token context; a value typed by hand is kept."""
    models = httpx.get(locked_server + "/v1/models",
                       headers={"Authorization": f"Bearer {KEY}"}).json()
    assert models["data"][0]["max_model_len"] == 256
    page = Page(driver, locked_server, max_tokens=None)
    page.set("api_key", KEY)
    page.field("api_key").send_keys(Keys.TAB)  # "change": the page asks /v1/models again
    page.wait(lambda: page.field("model").text == "llama-demo", timeout=10)
    assert page.field("max_tokens").get_attribute("value") == "64"
    page = Page(driver, locked_server, max_tokens="200")
    page.set("api_key", KEY)
    page.field("api_key").send_keys(Keys.TAB)
    page.wait(lambda: page.field("model").text == "llama-demo", timeout=10)
    assert page.field("max_tokens").get_attribute("value") == "200"


# Each chat request the page makes, with its body and the status it got.
RECORD_REQUESTS = """
window.sent = [];
const original = window.fetch;
window.fetch = async (url, options) => {
  const response = await original(url, options);
  if (String(url).endsWith("/v1/chat/completions")) {
    window.sent.push({body: JSON.parse(options.body), status: response.status});
  }
  return response;
};"""


def prompt_tokens(messages):
    """The prompt's tokens as the server counts them (the demo model's tokenizer and chat
    format), computed here."""
    from llama.chat_formats import dialog_tokens
    from llama.cli.demo import DEMO_TOKENIZER_PATH
    from llama.tokenizers import load_tokenizer

    return len(dialog_tokens(load_tokenizer(DEMO_TOKENIZER_PATH), messages))


def allowance(question):
    """What the page may leave unused: it counts a message not yet sent at one token per UTF-8
    byte, plus the chat format's markup and slack, and an answer's end at 2 tokens."""
    return len(question.encode()) + 40


def refused(url):
    metrics = httpx.get(url + "/metrics").text
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith('llama_requests_total{route="/v1/chat/completions",status="4'))


def test_the_history_is_sized_from_token_counts_and_nothing_is_refused(driver, demo_server):
    """On the demo model's defaults the conversation keeps as many exchanges as fit with Max
    tokens (128 of 512), dropping the oldest before sending: no request gets a 400."""
    questions = ["What is a list?", "How do I open a file?", "What is a tuple?",
                 "What does yield do?", "How are exceptions raised?", "What is a class?"]
    refused_before = refused(demo_server)
    page = Page(driver, demo_server, max_tokens=None)
    page.js(RECORD_REQUESTS)
    page.wait(lambda: page.field("max_tokens").get_attribute("value") == "128", timeout=10)
    answers = [page.ask(question) for question in questions]
    sent = page.js("return window.sent")
    assert [request["status"] for request in sent] == [200] * len(questions)
    assert refused(demo_server) == refused_before
    exchanges = []  # the whole conversation, as the page shows it
    for question, answer in zip(questions, answers):
        exchanges.append([user(question), assistant(answer)])
    kept = []
    for i, request in enumerate(sent):
        body = request["body"]
        assert body["max_tokens"] == 128 and body["stream_options"] == {"include_usage": True}
        messages = body["messages"]
        k = (len(messages) - 1) // 2  # exchanges sent before the question: the latest ones
        kept.append(k)
        shown = [dict(m, content=m["content"].lstrip()) for m in messages]  # as on the page
        assert shown == [m for pair in exchanges[i - k:i] for m in pair] + [user(questions[i])]
        assert prompt_tokens(messages) + 128 <= 512
        if k < i:  # one more exchange would not have fitted
            more = [m for pair in exchanges[i - k - 1:i] for m in pair] + [user(questions[i])]
            assert prompt_tokens(more) + 128 > 512 - allowance(questions[i]), (i, k)
    assert max(kept) >= 2 and kept[-1] < len(questions) - 1, kept  # several turns; some dropped
    assert len(page.js("return document.querySelectorAll('.dropped')")) == \
        2 * (len(questions) - 1 - kept[-1])
    last = sent[-1]["body"]["messages"]
    assert answers[-1] == api(demo_server, last, 128)


def test_max_tokens_shrinks_to_the_room_left(driver, demo_server):
    """Max tokens 500 of a 512-token context: each request asks for what is left (the
    history dropped first), and none is refused."""
    page = Page(driver, demo_server, max_tokens="500")
    page.js(RECORD_REQUESTS)
    questions = ["What is a list?", "How do I open a file?"]
    for question in questions:
        page.ask(question)
    sent = page.js("return window.sent")
    assert [request["status"] for request in sent] == [200, 200]
    for question, request in zip(questions, sent):
        body = request["body"]
        assert body["messages"] == [user(question)]  # no room for the first exchange
        room = 512 - prompt_tokens(body["messages"])
        assert room - allowance(question) <= body["max_tokens"] <= room
    assert [kind for kind, _ in page.messages()] == ["user", "assistant"] * 2
