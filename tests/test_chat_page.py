"""The chat page of `lmlab serve` in a real headless Chromium (Debian's `chromium`, driven by Playwright): a typed
question gets an answer that streams in piece by piece, and the next turn sends the whole conversation.

The page is found by its accessible names (label "Message", buttons "Send"), so a page that loses them fails."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="the chat page test drives Chromium with Playwright: "
                                                             "pip install -e '.[test]'")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("no Chromium at /usr/bin/chromium: `make install-test` installs Debian's chromium package (it needs "
                "root and apt-get)", allow_module_level=True)

from lmlab.apps.rag import rag_index  # noqa: E402
from lmlab.inference.rag_api import RagService  # noqa: E402
from lmlab.inference.server import build  # noqa: E402
from tests.test_rag import write_docs  # noqa: E402
from tests.test_serve import RunningServer, make_tiny_model_folder  # noqa: E402

# Records every change of the newest answer's text, to tell a streamed answer from one that appears at once.
WATCH_ANSWERS = """
window.answerLengths = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll('#conversation li.assistant .content');
  if (answers.length) window.answerLengths.push(answers[answers.length - 1].textContent.length);
}).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
"""


@contextlib.contextmanager
def chat_page(url: str):
    """The chat page open in headless Chromium, its model listed."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            sync_api.expect(page.locator("#model-name")).to_have_text("tiny-chat")
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    folder = make_tiny_model_folder(tmp_path_factory.mktemp("page") / "tiny-chat")
    built = build(str(folder), max_batch=4, context=256)
    # The tiny model writes 24 tokens in a few ms, which a busy machine can deliver to the page in one network
    # read, so that even a streamed answer would appear at once. 20 ms per model call paces the tokens the way a
    # real model does, so the page sees them arrive one by one.
    model, forward = built.engine.model, built.engine.model.forward

    def paced_forward(*args, **kwargs):
        time.sleep(0.02)
        return forward(*args, **kwargs)

    model.forward = paced_forward
    server = RunningServer(built)
    yield server
    server.close()


def test_chat_page_streams_an_answer_and_keeps_the_conversation(running):
    question = "Who sees bob in the park?"
    expected = running.client().chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0)
    assert expected.usage.completion_tokens >= 10, "the test model should give a long enough answer"
    answer = expected.choices[0].message.content

    with chat_page(running.url) as page:
        page.locator("summary").click()  # settings: greedy, so that the answer is known in advance
        page.get_by_label("Temperature (0 is greedy)").fill("0")
        page.get_by_label("Longest answer, in tokens").fill("24")
        page.evaluate(WATCH_ANSWERS)

        page.get_by_label("Message", exact=True).fill(question)
        page.get_by_role("button", name="Send").click()
        reply = page.locator("#conversation li.assistant .content").first
        sync_api.expect(reply).to_have_text(answer, timeout=20_000)
        sync_api.expect(page.get_by_role("button", name="Send")).to_be_enabled()
        lengths = page.evaluate("window.answerLengths")
        assert len(set(lengths)) >= 3, f"the answer did not stream (text lengths seen: {lengths})"
        assert page.get_by_role("log").get_attribute("aria-live") == "polite"

        # Second turn, sent with the keyboard: the request carries the whole conversation.
        with page.expect_request("**/v1/chat/completions") as sent:
            page.get_by_label("Message", exact=True).fill("And then?")
            page.get_by_label("Message", exact=True).press("Enter")
        messages = sent.value.post_data_json["messages"]
        assert messages == [{"role": "user", "content": question}, {"role": "assistant", "content": answer},
                            {"role": "user", "content": "And then?"}]
        sync_api.expect(page.locator("#conversation li")).to_have_count(4)
        sync_api.expect(page.get_by_role("button", name="Send")).to_be_enabled(timeout=20_000)
        assert page.locator("#error").is_hidden()


def test_chat_page_retrieval_switch_shows_the_cited_sources(running, minilm_path, tmp_path):
    """A server with --rag: the page offers the switch (one without an index shows none); with it
    on, the question goes out with the retrieved chunks numbered before it, the answer is the model's answer to
    exactly those messages, and the sources are listed under it."""
    rag_index(str(write_docs(tmp_path / "docs")), str(tmp_path / "idx"), str(minilm_path), chunk_tokens=12,
              overlap=2, progress=False)
    question = "When does the night train from Vienna leave?"
    with chat_page(running.url) as page:
        try:
            assert page.get_by_label("Answer from the documents (retrieval)").is_hidden()
            running.server.rag = RagService(tmp_path / "idx")
            page.reload()
            switch = page.get_by_label("Answer from the documents (retrieval)")
            sync_api.expect(switch).to_be_visible()
            switch.check()
            page.locator("summary").click()
            page.get_by_label("Temperature (0 is greedy)").fill("0")
            page.get_by_label("Longest answer, in tokens").fill("8")
            page.get_by_label("Sources retrieved per question (with retrieval on)").fill("1")
            with page.expect_request("**/v1/chat/completions") as sent:
                page.get_by_label("Message", exact=True).fill(question)
                page.get_by_role("button", name="Send").click()
            messages = sent.value.post_data_json["messages"]
            assert messages[-1]["content"].startswith("Sources:\n[1] The night train from Vienna")
            assert "[2]" not in messages[-1]["content"]
            assert messages[-1]["content"].endswith(f"Question: {question}")
            sources = page.get_by_role("list", name="Sources").locator("li")
            sync_api.expect(sources.first).to_contain_text("trains.txt")
            sync_api.expect(page.get_by_role("button", name="Send")).to_be_enabled(timeout=20_000)
            expected = running.client().chat.completions.create(model="tiny-chat", messages=messages, max_tokens=8,
                                                                temperature=0)
            reply = page.locator("#conversation li.assistant .content").first
            sync_api.expect(reply).to_have_text(expected.choices[0].message.content)
            assert page.locator("#error").is_hidden()
        finally:
            running.server.rag = None
