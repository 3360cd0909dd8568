"""A self-contained HTML page that draws sampled trees: one file, CSS, JS and data inline, no fetches.

Per prompt, all its trees hang under the prompt (the common root). Each node is a box with its action
text, its observation collapsed in a <details>, its subtree value V(n) (mean reward of the leaves under
it) and, for leaves, the reward; the box is coloured by the node's advantage — the mean advantage of
the trajectories through it, (A⁺ + A⁻) / multiplicity — on a red (negative) to green (positive) scale.
Clicking a node shows its full text and numbers in a side panel.
"""

from __future__ import annotations

import html
import json

from arborl.components.advantages.preferences import node_advantage
from arborl.components.envs.protocol import INFO_CLOSE, INFO_OPEN
from arborl.components.sampling.forest import Forest, leaf_key, node_key


def split_step(text: str) -> tuple[str, str]:
    """(action text, observation text) of a node's text: the observation is the trailing
    `<information> … </information>` block the environment appended; a node without one has no observation."""
    start = text.rfind(f" {INFO_OPEN}")
    if start < 0 or not text.rstrip().endswith(INFO_CLOSE):
        return text, ""
    return text[:start], text[start + 1 :]


def _json_for_script(data: object) -> str:
    """JSON safe inside <script>: `<`, `>` and `&` escaped, so no text can close the script element."""
    return json.dumps(data, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def tree_data(trees: Forest, rewards: list[dict], advantages: list[dict], prompts: dict[str, str],
              max_prompts: int | None = None) -> dict:
    """The page's data: the first `max_prompts` prompts (by prompt_id) with one record per node."""
    prompt_ids = sorted({k.prompt_id for k in trees.nodes})
    shown = set(prompt_ids[:max_prompts] if max_prompts is not None else prompt_ids)
    rewards = [r for r in rewards if r["prompt_id"] in shown]
    forest = Forest.from_rows(n for k, n in trees.nodes.items() if k.prompt_id in shown).with_rewards(rewards)
    reward = {leaf_key(r): r for r in rewards}
    adv = {node_key(a): node_advantage(a["adv_pos"], a["adv_neg"], a["multiplicity"])
           for a in advantages if a["prompt_id"] in shown}
    records = []
    for key in sorted(forest.nodes):
        n = forest.nodes[key]
        step, obs = split_step(n["text"])
        r = reward.get(key)
        records.append({
            "key": f"{key[0]}|{key[1]}|{key[2]}", "prompt_id": key[0], "tree_id": key[1], "node_id": key[2],
            "parent": None if n["parent_id"] is None else f"{key[0]}|{key[1]}|{n['parent_id']}",
            "depth": n["depth"], "round": n["expansion_round"], "action": n["action"], "step": step,
            "observation": obs, "is_leaf": n["is_leaf"], "finish_reason": n["finish_reason"],
            "reward": None if r is None else r["reward"], "correct": None if r is None else r["correct"],
            "value": forest.values[key], "advantage": adv.get(key),
        })
    return {
        "prompts": [{"prompt_id": p, "text": prompts.get(p, "")} for p in sorted(shown)],
        "nodes": records,
        "total_prompts": len(prompt_ids),
    }


def build_html(trees: Forest, rewards: list[dict], advantages: list[dict], prompts: dict[str, str],
               title: str = "arborl trees", max_prompts: int | None = None) -> str:
    """One HTML document drawing the sampled trees with their reward rows (REWARDS) and advantage rows
    (ADVANTAGES); `prompts` maps prompt_id → prompt text. Only the first `max_prompts` prompts are drawn."""
    data = tree_data(trees, rewards, advantages, prompts, max_prompts)
    return (_PAGE.replace("__TITLE__", html.escape(title))
            .replace("__DATA__", _json_for_script(data)))


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
  body { font: 13px/1.35 system-ui, sans-serif; margin: 0; color: #222; }
  header { padding: 8px 14px; border-bottom: 1px solid #ccc; background: #f7f7f7; }
  header h1 { font-size: 16px; margin: 0 0 4px; }
  .legend span { display: inline-block; padding: 1px 6px; margin-right: 4px; border-radius: 3px; }
  main { margin-right: 380px; padding: 8px 14px; }
  section.prompt { margin: 10px 0 18px; }
  section.prompt h2 { font-size: 13px; font-weight: 600; background: #eef; padding: 4px 8px; margin: 0; }
  ul.children { list-style: none; margin: 0; padding-left: 22px; border-left: 1px dashed #bbb; }
  li { margin: 4px 0; }
  .node { display: inline-block; max-width: 760px; border: 1px solid #999; border-radius: 4px; padding: 3px 6px;
          cursor: pointer; vertical-align: top; }
  .node.selected { outline: 2px solid #2a5bd7; }
  .node .meta { color: #555; font-size: 11px; }
  .node .step { font-family: ui-monospace, monospace; white-space: pre-wrap; word-break: break-word; }
  .node details { font-size: 11px; color: #444; }
  .node details pre { white-space: pre-wrap; margin: 2px 0; max-height: 160px; overflow: auto; }
  .chip { display: inline-block; padding: 0 4px; border-radius: 3px; margin-left: 4px; font-size: 11px; }
  .leaf { border-width: 2px; }
  aside#panel { position: fixed; top: 0; right: 0; width: 360px; height: 100%; overflow: auto; box-sizing: border-box;
                border-left: 1px solid #ccc; background: #fcfcfc; padding: 10px; }
  aside#panel pre { white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, monospace; }
</style>
</head>
<body>
<header>
  <h1>__TITLE__</h1>
  <div id="summary"></div>
  <div class="legend">advantage: <span style="background:rgba(200,30,30,.5)">negative</span>
    <span style="background:#fff;border:1px solid #ccc">0</span>
    <span style="background:rgba(30,160,30,.5)">positive</span>
    &nbsp; V = mean reward of the leaves below; R = leaf reward</div>
</header>
<aside id="panel"><p>Click a node to see its full text.</p></aside>
<main id="trees"></main>
<script type="application/json" id="tree-data">__DATA__</script>
<script>
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("tree-data").textContent);
  const kids = new Map();
  for (const n of data.nodes) {
    const parent = n.parent === null ? "root|" + n.prompt_id : n.parent;
    if (!kids.has(parent)) kids.set(parent, []);
    kids.get(parent).push(n);
  }
  const maxAdv = Math.max(1e-9, ...data.nodes.map(n => Math.abs(n.advantage || 0)));
  const values = data.nodes.map(n => n.value);
  const vLo = Math.min(...values, 0), vHi = Math.max(...values, 1e-9);

  function advColour(a) {
    if (a === null || a === undefined) return "#fff";
    const t = Math.min(1, Math.abs(a) / maxAdv) * 0.6;
    return a >= 0 ? `rgba(30,160,30,${t})` : `rgba(200,30,30,${t})`;
  }
  function valueColour(v) {
    const t = (v - vLo) / (vHi - vLo || 1);
    return `hsl(${Math.round(120 * t)}, 70%, 80%)`;
  }
  function fmt(x) { return x === null || x === undefined ? "–" : (x >= 0 ? "+" : "") + x.toFixed(3); }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function chip(text, colour) { const c = el("span", "chip", text); c.style.background = colour; return c; }

  function show(n, box) {
    document.querySelectorAll(".node.selected").forEach(e => e.classList.remove("selected"));
    box.classList.add("selected");
    const panel = document.getElementById("panel");
    panel.replaceChildren();
    panel.append(el("h3", "", `tree ${n.tree_id} · node ${n.node_id}`));
    const facts = [`prompt: ${n.prompt_id}`, `depth ${n.depth}, expansion round ${n.round}, action ${n.action}`,
                   `V = ${n.value.toFixed(3)}, advantage ${fmt(n.advantage)}`];
    if (n.is_leaf) facts.push(`leaf (${n.finish_reason}): reward ${n.reward}, correct ${n.correct}`);
    for (const f of facts) panel.append(el("div", "", f));
    panel.append(el("h4", "", "action"), el("pre", "panel-step", n.step));
    panel.append(el("h4", "", "observation"), el("pre", "panel-observation", n.observation || "(none)"));
  }

  function drawNode(n) {
    const li = el("li");
    const box = el("div", "node" + (n.is_leaf ? " leaf" : ""));
    box.dataset.key = n.key;
    box.style.background = advColour(n.advantage);
    const meta = el("div", "meta", `t${n.tree_id}·n${n.node_id} d${n.depth} ${n.action}`);
    meta.append(chip("V " + n.value.toFixed(2), valueColour(n.value)));
    meta.append(chip("A " + fmt(n.advantage), advColour(n.advantage)));
    if (n.is_leaf) meta.append(chip(`R ${n.reward === null ? "?" : n.reward.toFixed(2)}${n.correct ? " ✓" : ""}`,
                                    valueColour(n.reward === null ? vLo : n.reward)));
    box.append(meta, el("div", "step", n.step));
    if (n.observation) {
      const d = el("details");
      d.append(el("summary", "", "observation"), el("pre", "", n.observation));
      box.append(d);
    }
    box.addEventListener("click", () => show(n, box));
    li.append(box);
    const children = kids.get(n.key) || [];
    if (children.length) li.append(drawList(children));
    return li;
  }
  function drawList(nodes) {
    const ul = el("ul", "children");
    for (const n of nodes) ul.append(drawNode(n));
    return ul;
  }

  const main = document.getElementById("trees");
  for (const p of data.prompts) {
    const sec = el("section", "prompt");
    sec.dataset.prompt = p.prompt_id;
    sec.append(el("h2", "", `${p.prompt_id}: ${p.text}`));
    sec.append(drawList(kids.get("root|" + p.prompt_id) || []));
    main.append(sec);
  }
  const shown = data.prompts.length;
  document.getElementById("summary").textContent =
    `${data.nodes.length} nodes, ${shown} of ${data.total_prompts} prompts` +
    (shown < data.total_prompts ? " (viewer.max_prompts)" : "");
  document.body.dataset.rendered = String(document.querySelectorAll(".node").length);
})();
</script>
</body>
</html>
"""
