"""The demo as a person uses it: headless Chromium (Debian's `chromium`, driven by Playwright) opens the
page served by the real `build_demo` + `launch`, picks an example image and its question, presses Ask
(and, in the Inspect tab, Show) and reads the answer and the map off the page; a screenshot is kept in the test's tmp dir. Skips, saying why, where
/usr/bin/chromium is missing (`make test` installs it when it can: `apt-get install -y chromium`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_demo import serve, session_bundle

from mmqa.app import build_demo
from mmqa.app.ui import builtin_examples

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 30_000  # page load and answer, each

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason=f"no browser: {CHROMIUM} is missing (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def page(data_dir):
    """(bundle, a Playwright page showing the served demo)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
    bundle = session_bundle(data_dir)
    demo = build_demo(bundle)
    url = serve(demo)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        tab = browser.new_page(viewport={"width": 1280, "height": 1000})
        tab.set_default_timeout(TIMEOUT_MS)
        tab.goto(url)
        yield bundle, tab
        browser.close()
    demo.close()


def test_a_question_asked_in_the_browser_gets_the_bundles_answer(page, tmp_path):
    bundle, tab = page
    image, question = builtin_examples(bundle.cfg)[0]
    tab.get_by_text(question, exact=True).click()  # the first example: fills the image and the question
    question_box = tab.get_by_placeholder("what colour is the circle?")
    tab.wait_for_function("q => document.querySelector(`textarea[placeholder='${q}']`).value.length > 0",
                          arg="what colour is the circle?")
    assert question_box.input_value() == question
    tab.get_by_role("button", name="Ask", exact=True).click()

    answer_box = tab.get_by_label("Answer", exact=True)
    answer_box.wait_for()
    tab.wait_for_function("el => el.value.length > 0", arg=answer_box.element_handle())
    shown = answer_box.input_value()
    tab.get_by_text("Top 5 answers").wait_for()
    tab.screenshot(path=tmp_path / "ask.png", full_page=True)

    assert shown in bundle.answers
    assert shown == bundle.answer(image, question).answer
    assert (tmp_path / "ask.png").stat().st_size > 10_000  # a real picture of the page
    new_words = tab.get_by_label("These words are new to this model", exact=True)
    assert new_words.input_value() == ""

    question_box.fill(question + " please")  # a word no training question has
    tab.get_by_role("button", name="Ask", exact=True).click()
    tab.wait_for_function("el => el.value.length > 0", arg=new_words.element_handle())
    assert new_words.input_value() == "please"


def test_the_inspect_tab_draws_the_chosen_map(page, tmp_path):
    bundle, tab = page
    image, question = builtin_examples(bundle.cfg)[0]
    tab.get_by_role("tab", name="Inspect").click()
    panel = tab.get_by_role("tabpanel")  # only the open tab's panel is on the page
    panel.get_by_text(question, exact=True).click()  # this tab's first example
    tab.wait_for_function("q => [...document.querySelectorAll(`textarea[placeholder='${q}']`)]"
                          ".some(t => t.offsetParent !== null && t.value.length > 0)", arg="what colour is the circle?")
    panel.locator("img").first.wait_for()  # the example's image is in the input box
    before = panel.locator("img").count()
    panel.get_by_role("button", name="Show", exact=True).click()
    answer_box = panel.get_by_label("Answer", exact=True)
    tab.wait_for_function("el => el.value.length > 0", arg=answer_box.element_handle())
    tab.wait_for_function("n => document.querySelectorAll('[role=tabpanel] img').length > n", arg=before)  # the map
    tab.screenshot(path=tmp_path / "inspect.png", full_page=True)
    assert answer_box.input_value().startswith(bundle.answer(image, question).answer + " (p = ")
    assert (tmp_path / "inspect.png").stat().st_size > 10_000
