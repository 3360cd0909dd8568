"""components.viewer.tree_html: the page's data, and the page itself rendered in headless Chromium.

The browser test drives a real Chromium over the DevTools protocol (127.0.0.1, a port the browser picks):
it loads the file, counts the drawn nodes, clicks one with a real mouse event and reads the side panel.
Under CI (env CI set) a missing Chromium fails the test; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from arborl.components.sampling.forest import Forest
from arborl.components.viewer.tree_html import build_html, split_step, tree_data

OBS = "<information> ann was born in rome . </information>"


def node(tid, nid, parent, depth, text, leaf):
    return {"prompt_id": "p1", "tree_id": tid, "node_id": nid, "parent_id": parent, "depth": depth,
            "expansion_round": 0, "token_ids": [1], "loss_mask": [True], "logprobs": [-1.0], "text": text,
            "action": "answer" if leaf else "search", "is_leaf": leaf, "finish_reason": "answer" if leaf else None,
            "policy_version": 0}


# Two trees of prompt p1: tree 0 is 0 → {1, 2}, tree 1 is 0 → 1. Node texts carry an observation when they search,
# and one text tries to close the script element.
NODES = [
    node(0, 0, None, 1, f"<search> ann born </search> {OBS}", False),
    node(0, 1, 0, 2, "<answer> rome </answer>", True),
    node(0, 2, 0, 2, "<answer> paris </script><b>x</b> </answer>", True),
    node(1, 0, None, 1, f"<search> ann </search> {OBS}", False),
    node(1, 1, 0, 2, "<answer> rome </answer>", True),
]
REWARDS = [
    {"prompt_id": "p1", "tree_id": t, "leaf_id": n, "reward": r, "correct": r == 1.0}
    for t, n, r in [(0, 1, 1.0), (0, 2, 0.2), (1, 1, 1.0)]
]
ADVANTAGES = [
    {"prompt_id": "p1", "tree_id": t, "node_id": n, "adv_pos": p, "adv_neg": q, "multiplicity": m}
    for t, n, p, q, m in [(0, 0, 0.5, -1.0, 2), (0, 1, 0.5, 0.0, 1), (0, 2, 0.0, -1.0, 1), (1, 0, 0.5, 0.0, 1),
                          (1, 1, 0.5, 0.0, 1)]
]
PROMPTS = {"p1": "<question> where was ann born ? </question>"}


def test_split_step():
    assert split_step(f"<search> ann </search> {OBS}") == ("<search> ann </search>", OBS)
    assert split_step("<answer> rome </answer>") == ("<answer> rome </answer>", "")
    assert split_step("<information> x") == ("<information> x", "")


def test_tree_data_values_advantages_and_prompt_limit():
    data = tree_data(Forest.from_rows(NODES), REWARDS, ADVANTAGES, PROMPTS)
    by = {n["key"]: n for n in data["nodes"]}
    assert len(by) == 5 and data["total_prompts"] == 1
    assert by["p1|0|0"]["value"] == pytest.approx(0.6) and by["p1|0|0"]["advantage"] == pytest.approx(-0.25)
    assert by["p1|0|0"]["observation"] == OBS and by["p1|0|0"]["parent"] is None
    assert by["p1|0|2"]["parent"] == "p1|0|0" and by["p1|0|2"]["reward"] == pytest.approx(0.2)
    other = [{**n, "prompt_id": "p0"} for n in NODES]
    both = Forest.from_rows(NODES + other)
    two = tree_data(both, REWARDS + [{**r, "prompt_id": "p0"} for r in REWARDS], ADVANTAGES, PROMPTS, 1)
    assert [p["prompt_id"] for p in two["prompts"]] == ["p0"] and two["total_prompts"] == 2
    assert {n["prompt_id"] for n in two["nodes"]} == {"p0"} and two["nodes"][0]["advantage"] is None


def test_page_is_self_contained_and_escapes_script_text():
    page = build_html(Forest.from_rows(NODES), REWARDS, ADVANTAGES, PROMPTS, title="t <1>")
    assert page.count("</script>") == 2  # the data block and the code block; the node text's one is escaped
    assert "<title>t &lt;1&gt;</title>" in page
    for ref in ("http://", "https://", "src=", "href=", "@import", "fetch(", "XMLHttpRequest"):
        assert ref not in page


# --- headless Chromium ---------------------------------------------------------------------------------------


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; CI must install it (.ci/run does: apt-get install -y chromium)")
    pytest.skip("chromium is not installed (apt-get install -y chromium); CI runs this test")


class Page:
    """A minimal Chrome DevTools protocol client for one page target."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=10)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, timeout: float = 10.0, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method:
                    return self.events.pop(i)
            self.events.append(json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic()))))

    def evaluate(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium with DevTools on 127.0.0.1 (port chosen by the browser); yields a Page on about:blank."""
    binary = chromium_binary()
    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [binary, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    page = None
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not open its DevTools port (exit code {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            targets = json.load(resp)
        page = Page(next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"))
        yield page
    finally:
        if page is not None:
            page.ws.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_viewer_renders_in_chromium_and_shows_text_on_click(browser, tmp_path):
    html_file = tmp_path / "trees.html"
    html_file.write_text(build_html(Forest.from_rows(NODES), REWARDS, ADVANTAGES, PROMPTS), encoding="utf-8")
    browser.call("Network.enable")
    browser.call("Page.enable")
    browser.call("Page.navigate", url=html_file.as_uri())
    browser.wait_event("Page.loadEventFired", timeout=20)

    requests = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    assert requests and all(u.startswith(("file://", "data:")) for u in requests), requests  # nothing fetched
    assert browser.evaluate("document.querySelectorAll('.node').length") == len(NODES)
    assert browser.evaluate("document.querySelectorAll('section.prompt').length") == 1
    # nested: tree 0's first step holds its two children
    assert browser.evaluate(
        "document.querySelector('[data-key=\"p1|0|0\"]').parentElement.querySelectorAll('.node').length") == 3
    # the observation is collapsed; the script-closing text is shown as text, not markup
    assert browser.evaluate("document.querySelector('[data-key=\"p1|0|0\"] details').open") is False
    assert browser.evaluate("document.querySelectorAll('#trees b').length") == 0
    assert "</script><b>x</b>" in browser.evaluate("document.querySelector('[data-key=\"p1|0|2\"] .step').textContent")
    # advantage colours: a negative node is red, a positive one green
    assert browser.evaluate("getComputedStyle(document.querySelector('[data-key=\"p1|0|2\"]')).backgroundColor") \
        .startswith("rgba(200, 30, 30")
    assert browser.evaluate("getComputedStyle(document.querySelector('[data-key=\"p1|1|1\"]')).backgroundColor") \
        .startswith("rgba(30, 160, 30")
    assert "Click a node" in browser.evaluate("document.getElementById('panel').textContent")

    # a real mouse click in the middle of tree 1's first step (on its text line, not the observation)
    box = browser.evaluate(
        "(() => { const r = document.querySelector('[data-key=\"p1|1|0\"] .step').getBoundingClientRect();"
        " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    for kind in ("mousePressed", "mouseReleased"):
        browser.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)
    panel = browser.evaluate("document.getElementById('panel').textContent")
    assert "tree 1 · node 0" in panel
    assert "<search> ann </search>" in panel and OBS in panel  # the full text, observation included
    assert browser.evaluate("document.querySelector('.node.selected').dataset.key") == "p1|1|0"
