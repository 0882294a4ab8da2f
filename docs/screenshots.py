"""Takes the README's screenshots of the chat page (docs/chat-light.png, docs/chat-dark.png) from a running
tandem, with Debian's chromium: `.venv/bin/python docs/screenshots.py --url http://127.0.0.1:8000`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
QUESTIONS = ["What is the capital of France?", "Write a Python function that reverses a string."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", default="", help="the server's API key, if it wants one")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=ARGS)
        context = browser.new_context(viewport={"width": 1200, "height": 760}, color_scheme="light")
        settings = {"temperature": 0, "top_p": 0.95, "max_tokens": 200, "system": "", "model": ""}
        script = f"localStorage.setItem('tandem.chat.settings', {json.dumps(json.dumps(settings))});"
        if args.key:
            script += f"localStorage.setItem('tandem.chat.apiKey', {json.dumps(args.key)});"
        context.add_init_script(script)
        page = context.new_page()
        page.goto(args.url + "/chat")
        page.locator("#model option").first.wait_for(state="attached")
        for question in QUESTIONS:
            page.fill("#prompt", question)
            page.press("#prompt", "Enter")
            page.locator('article.assistant[data-state="done"]').nth(QUESTIONS.index(question)).wait_for(
                timeout=120_000
            )
        page.screenshot(path=HERE / "chat-light.png")
        page.click("#theme")
        page.screenshot(path=HERE / "chat-dark.png")
        browser.close()


if __name__ == "__main__":
    main()
