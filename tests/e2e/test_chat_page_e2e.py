"""The chat page in a real browser (Debian's chromium driven by Playwright) against the real model behind an
API key: the key prompt, the model picker, a streamed answer, Stop (the worker's running gauge back to 0),
regenerate and edit, the conversation found again after a reload and in the export, light and dark. The one
scripted stream is the hostile answer, which a 135M model will not write on demand: Playwright hands the real
page code a crafted SSE body, and the test checks that nothing in it ran."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Server, start_server

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Route

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
# Headless on a closed network: without the background-networking flags chromium keeps dialling Google.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEY = "sk-chat-page"
AUTH = {"authorization": f"Bearer {KEY}"}
STORY = "Write a very long story about a dragon and a knight."
STORED = "JSON.parse(localStorage.getItem('tandem.chat.conversations'))"


def browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"no {CHROMIUM}: apt-get install chromium (Playwright cannot download a browser here)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed: pip install -e '.[test]'"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    missing = browser_missing()
    if missing and os.environ.get("TANDEM_REQUIRE_BROWSER"):  # CI sets it: there the test must run
        pytest.fail(f"TANDEM_REQUIRE_BROWSER is set but {missing}")
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def chat_server(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A tandem of its own, with an API key: its running gauge is this module's alone."""
    server = start_server(tmp_path_factory.mktemp("chat-page"), f"--gateway-arg=--api-key={KEY}")
    yield server
    assert server.stop() == 0, server.log()


@contextlib.contextmanager
def open_page(browser: Browser, server: Server, *, key: str | None = KEY, **context: Any) -> Iterator[Page]:
    """A fresh browser profile on the page; `key` already stored, as after a first visit. Any uncaught
    error in the page's JS fails the test."""
    ctx = browser.new_context(accept_downloads=True, **context)
    if key:
        ctx.add_init_script(f"localStorage.setItem('tandem.chat.apiKey', {json.dumps(key)})")
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{server.base_url}/")
    try:
        yield page
    finally:
        ctx.close()
    assert not errors, errors


@pytest.fixture
def page(browser: Browser, chat_server: Server) -> Iterator[Page]:
    with open_page(browser, chat_server) as page:
        yield page


def model_of(server: Server) -> str:
    return str(httpx.get(f"{server.base_url}/v1/models", headers=AUTH).json()["data"][0]["id"])


def greedy_answer(server: Server, messages: list[dict[str, str]], max_tokens: int) -> str:
    body = {"model": model_of(server), "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    return str(response.json()["choices"][0]["message"]["content"])


def metric(server: Server, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def settings(page: Page, *, system: str = "", temperature: str = "0", max_tokens: str = "") -> None:
    page.click("#open-settings")
    page.fill("#system", system)
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)
    page.click("#save-settings")


def send(page: Page, text: str) -> None:
    page.locator("#model option").first.wait_for(state="attached")  # the model list is in
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_reply(page: Page, state: str = "done") -> Any:
    reply = page.locator("article.assistant").last
    reply.and_(page.locator(f'[data-state="{state}"]')).wait_for(state="attached", timeout=60_000)
    return reply


def test_key_model_streamed_answer_reload_and_export(browser: Browser, chat_server: Server) -> None:
    from playwright.sync_api import expect

    with open_page(browser, chat_server, key=None) as page:
        # /v1/models answered 401: the page asks; a wrong key is refused and it asks again
        expect(page.locator("#key-reason")).to_have_text("This server wants an API key.")
        page.fill("#key", "sk-wrong")
        page.click("#save-key")
        expect(page.locator("#key-reason")).to_have_text("The server refused that key.")
        page.fill("#key", KEY)
        page.click("#save-key")
        model = model_of(chat_server)
        expect(page.locator("#model option")).to_have_text([model])

        system, question = "You are a helpful assistant.", "What is the capital of France?"
        settings(page, system=system, max_tokens="40")
        # Every length the answer showed on its way in, recorded by the browser itself.
        page.evaluate(
            """() => { window.seen = [];
              new MutationObserver(() => {
                const reply = document.querySelector('article.assistant .content');
                if (reply) window.seen.push(reply.textContent.length);
              }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
            }"""
        )
        send(page, question)
        reply = last_reply(page)
        final = len(reply.locator(".content").text_content() or "")
        partial = {length for length in page.evaluate("window.seen") if 0 < length < final}
        assert len(partial) >= 2, f"the answer did not stream in: lengths {sorted(partial)} before {final}"

        # The page sent the system prompt and the settings: greedy decoding gives the API's answer exactly.
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        expected = greedy_answer(chat_server, messages, 40)
        stored = page.evaluate(STORED)
        assert [m["content"] for m in stored[0]["messages"]] == [question, expected]
        assert "Paris" in (reply.locator(".content").text_content() or "")
        expect(reply.locator(".stats")).to_contain_text("tokens")

        page.reload()
        expect(page.locator("#conversations li")).to_have_count(1)
        expect(page.locator("#conversations li.current .title")).to_have_text(question)
        expect(page.locator("article.user .content")).to_have_text(question)
        expect(page.locator('article.assistant[data-state="done"] .content')).to_contain_text("Paris")

        with page.expect_download() as download:
            page.click("#export")
        exported = json.loads(Path(download.value.path()).read_text())
        assert exported["format"] == "tandem-chat" and exported["version"] == 1
        [conversation] = exported["conversations"]
        assert conversation["system"] == system and conversation["model"] == model
        assert [(m["role"], m["content"]) for m in conversation["messages"]] == [
            ("user", question),
            ("assistant", expected),
        ]


def test_stop_aborts_the_generation_in_the_worker(page: Page, chat_server: Server) -> None:
    from playwright.sync_api import expect

    aborted = metric(chat_server, "tandem:request_success_total", finished_reason="abort")
    settings(page, max_tokens="4000")  # a long story at temperature 0: it is still being written at Stop
    send(page, STORY)
    reply = last_reply(page, "streaming")
    expect(reply.locator(".content")).not_to_have_text("")
    running = lambda: metric(chat_server, "tandem:num_requests_running")  # noqa: E731
    wait_until(lambda: running() == 1)  # the worker's heartbeat brings the gauge every 0.5 s

    page.click("#stop")
    expect(reply).to_have_attribute("data-state", "stopped")
    wait_until(lambda: running() == 0)
    assert metric(chat_server, "tandem:request_success_total", finished_reason="abort") == aborted + 1
    expect(page.locator("#send")).to_be_visible()
    expect(reply.locator(".stats")).to_contain_text("stopped")
    assert page.evaluate(STORED)[0]["messages"][1]["state"] == "stopped"  # kept, partial text and all


def test_regenerate_and_edit(page: Page, chat_server: Server) -> None:
    from playwright.sync_api import expect

    settings(page, max_tokens="16")
    france, germany = "What is the capital of France?", "What is the capital of Germany?"
    send(page, france)
    last_reply(page)
    first = page.evaluate(STORED)[0]["messages"][1]["content"]
    chats = lambda: metric(chat_server, "tandem:request_success_total")  # noqa: E731
    before = chats()

    page.locator("article.assistant button[data-action=regenerate]").click()
    last_reply(page)
    wait_until(lambda: chats() == before + 1)  # a new generation, not the old text kept
    expect(page.locator("article")).to_have_count(2)
    assert page.evaluate(STORED)[0]["messages"][1]["content"] == first  # greedy, same history: same answer

    page.locator("article.user button[data-action=edit]").click()
    page.fill("article.user textarea.editor", germany)
    page.locator("article.user button[data-action=save-edit]").click()
    last_reply(page)
    expect(page.locator("article")).to_have_count(2)  # the old answer went with the old question
    messages = page.evaluate(STORED)[0]["messages"]
    expected = greedy_answer(chat_server, [{"role": "user", "content": germany}], 16)
    assert [m["content"] for m in messages] == [germany, expected]


HOSTILE = (
    "Hi <img src=x onerror=\"window.pwned='img'\"> and [a link](javascript:window.pwned='md-link') "
    "<a href=\"javascript:window.pwned='a'\">another</a> <script>window.pwned='script'</script>"
    "<svg><animate onbegin=\"window.pwned='svg'\" attributeName=x dur=1s></animate></svg>"
    "<iframe src=\"javascript:window.pwned='iframe'\"></iframe>"
    "<form><input value=fake-key-prompt></form><style>body{display:none}</style>"
    '<a href="https://example.com/">safe</a>\n\n```python\nprint("hi")\n```\n'
)


def sse(*deltas: dict[str, str]) -> str:
    chunks = [{"choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in deltas]
    return "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"


def test_hostile_answer_renders_inert(browser: Browser, chat_server: Server) -> None:
    from playwright.sync_api import expect

    # bypass_csp: the page's CSP would stop inline handlers too; this checks DOMPurify on its own.
    with open_page(browser, chat_server, bypass_csp=True) as page:
        thinking = "Let me think <img src=y onerror=\"window.pwned='thinking'\">"
        body = sse({"role": "assistant"}, {"reasoning_content": thinking}, {"content": HOSTILE})

        def crafted(route: Route) -> None:
            route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body)

        page.route("**/v1/chat/completions", crafted)
        send(page, "Say something nasty.")
        reply = last_reply(page)
        content = reply.locator(".content")
        expect(content.locator("img")).to_have_count(1)  # rendered, not dropped wholesale...
        # The broken image has failed to load (our listener comes after any handler the answer could have set).
        content.locator("img").evaluate(
            "img => new Promise(done => img.complete ? setTimeout(done) : img.addEventListener('error', done))"
        )
        assert page.evaluate("window.pwned") is None  # ...and nothing in it ran
        messages = page.locator("#messages")
        for selector in ("[onerror]", "[onbegin]", "script", "iframe", "form", "input", "style", "[style]"):
            expect(messages.locator(selector)).to_have_count(0)
        hrefs = messages.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
        assert not [h for h in hrefs if h and h.strip().lower().startswith("javascript:")], hrefs
        expect(page.locator("body")).to_be_visible()  # the answer's <style> did not hide the page
        expect(content.locator("a", has_text="safe")).to_have_attribute("rel", "noopener noreferrer")
        expect(content.locator("code.hljs.language-python .hljs-built_in")).to_have_text("print")

        # thinking shown apart from the answer, folded once the answer began, and unfoldable
        details = reply.locator("details.thinking")
        expect(details.locator("summary")).to_have_text("Thinking")
        expect(details).not_to_have_attribute("open", "")
        details.locator("summary").click()
        expect(details.locator(".thinking-body")).to_contain_text("Let me think")
        assert "Let me think" not in (content.text_content() or "")


def test_light_and_dark(browser: Browser, chat_server: Server) -> None:
    from playwright.sync_api import expect

    with open_page(browser, chat_server, color_scheme="dark") as page:
        html = page.locator("html")
        expect(html).to_have_attribute("data-theme", "dark")  # the system's choice, at first
        assert page.evaluate("document.getElementById('code-light').disabled") is True
        page.click("#theme")
        expect(html).to_have_attribute("data-theme", "light")
        assert page.evaluate("document.getElementById('code-dark').disabled") is True
        page.reload()
        expect(html).to_have_attribute("data-theme", "light")  # the reader's choice, kept
