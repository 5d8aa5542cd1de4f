// The lead's page (/lead) of `rlhfkit annotate serve`. No framework, no build step.
//
// Everything from the server is put in with textContent or text nodes; prompts and responses
// go through the annotator page's markdown renderer (window.rlhfkitRender, from annotate.js),
// which builds elements from a fixed list of tags, so markup in model text, names or reasons
// is shown as text and never runs.
//
// Per annotator, besides counts and speed: accuracy on check questions (`serve --checks`), agreement
// with the other voters' majority, and position bias (share of decided votes for the left response).
//
// The lead token comes from the page URL (#token=...), is kept in sessionStorage under its own
// key (an annotator token in the same browser is not touched) and removed from the address bar.
"use strict";

(function () {
  const TOKEN_KEY = "rlhfkit-lead-token";
  const $ = (id) => document.getElementById(id);
  const render = window.rlhfkitRender;
  // Canonical choices the lead can settle with, per mode, and their button labels.
  const SETTLE = {
    pairs: [["a", "A (responses[0]) better"], ["tie", "Tie"], ["b", "B (responses[1]) better"]],
    thumbs: [["up", "\u{1F44D} Good"], ["down", "\u{1F44E} Bad"]],
  };
  const common = window.rlhfkitCommon; // common.js: el, readToken, api, say
  const el = common.el;
  const say = common.say;
  let token = null;
  let busy = false;

  function readToken() { return common.readToken(TOKEN_KEY, false); }

  function api(path, body) { return common.api(token, path, body, ""); }

  function fmt(x, digits) { return x === null || x === undefined ? "n/a" : Number(x).toFixed(digits); }
  // A share with its count: "75% (4)", or "n/a" when there is nothing to count.
  function share(x, n) { return x === null || x === undefined ? "n/a" : Math.round(x * 100) + "% (" + n + ")"; }

  function renderAnnotators(list) {
    const body = $("annotators").tBodies[0];
    body.replaceChildren();
    for (const a of list) {
      const tr = el("tr");
      tr.dataset.name = a.name;
      tr.append(el("td", "", a.name), el("td", "state-" + a.state, a.state), el("td", "", String(a.votes)),
        el("td", "", String(a.skips)), el("td", "", String(a.last_hour)), el("td", "", fmt(a.seconds_per_label, 1)),
        el("td", "checks", share(a.check_accuracy, a.checks)),
        el("td", "majority", share(a.majority_agreement, a.majority_items)),
        el("td", "left", share(a.left_share, a.left_votes)));
      const manage = el("td");
      const actions = a.state === "active" ? ["pause", "revoke"] : a.state === "paused" ? ["resume", "revoke"] : [];
      for (const action of actions) {
        const button = el("button", "", action.charAt(0).toUpperCase() + action.slice(1));
        button.type = "button";
        button.dataset.action = action;
        button.addEventListener("click", () => {
          if (action === "revoke" && !window.confirm("Revoke " + a.name + "'s token? Their labels are kept.")) return;
          act(() => api("/api/lead/annotator", { name: a.name, action: action }), a.name + ": " + action + "d.");
        });
        manage.append(button);
      }
      tr.append(manage);
      body.append(tr);
    }
  }

  function renderAgreement(agreement) {
    const parts = ["Fleiss' kappa: " + fmt(agreement.fleiss, 3) + " over " + agreement.fleiss_items + " item(s)"];
    for (const c of agreement.cohen) parts.push("Cohen's kappa " + c.pair[0] + " / " + c.pair[1] + ": " + fmt(c.kappa, 3) + " (" + c.shared + " shared)");
    $("agreement-text").textContent = parts.join("; ");
    const body = $("by-day").tBodies[0];
    body.replaceChildren();
    if (agreement.by_day.length === 0) {
      const tr = el("tr");
      const td = el("td", "", "No item has two votes yet.");
      td.colSpan = 3;
      tr.append(td);
      body.append(tr);
    }
    for (const d of agreement.by_day) {
      const tr = el("tr");
      tr.append(el("td", "", d.day), el("td", "", String(d.items)), el("td", "", Math.round(d.agree * 100) + "%"));
      body.append(tr);
    }
  }

  function renderItem(item, mode) {
    const card = el("article", "item");
    card.dataset.item = String(item.item_index);
    card.append(el("h3", "", "Item " + item.item_index));
    card.append(el("h2", "", "Prompt"));
    const prompt = el("div", "text");
    prompt.dir = "auto";
    render.prompt(prompt, item.prompt);
    card.append(prompt);
    const responses = el("div", "responses");
    item.responses.forEach((text, i) => {
      const box = el("div");
      box.append(el("h2", "", mode === "thumbs" ? "Response" : "Response " + "AB"[i] + " (responses[" + i + "])"));
      const body = el("div", "text");
      body.dir = "auto";
      render.markdown(body, text);
      box.append(body);
      responses.append(box);
    });
    card.append(responses);
    const counts = Object.entries(item.votes).map(([choice, n]) => choice + ": " + n).join(", ");
    card.append(el("p", "votes", "Votes: " + counts + " \u00b7 wants " + item.votes_wanted));
    if (item.voters.length) {
      const voters = el("ul", "skips");
      for (const v of item.voters) voters.append(el("li", "", v.annotator + " voted " + v.choice + (v.reason ? ": " + v.reason : "")));
      card.append(voters);
    }
    const skips = el("ul", "skips");
    for (const s of item.skips) skips.append(el("li", "", s.annotator + " skipped" + (s.reason ? ": " + s.reason : " (no reason)")));
    if (item.skips.length) card.append(skips);
    const settle = el("div", "settle");
    const reason = el("input");
    reason.type = "text";
    reason.maxLength = 2000;
    reason.placeholder = "Reason for your decision (optional)";
    reason.dir = "auto";
    settle.append(reason);
    for (const [choice, label] of SETTLE[mode] || SETTLE.pairs) {
      const button = el("button", "", "Settle: " + label);
      button.type = "button";
      button.dataset.settle = choice;
      button.addEventListener("click", () =>
        act(() => api("/api/lead/settle", { item_index: item.item_index, choice: choice, reason: reason.value.trim() }),
          "Item " + item.item_index + " settled: " + choice + "."));
      settle.append(button);
    }
    // One more annotator: the pair needs one vote more than it has, so someone who has not seen it gets it.
    const more = el("button", "ask-more", "Ask one more");
    more.type = "button";
    more.dataset.askMore = String(item.item_index);
    more.title = "Raise this item's votes wanted by one: an annotator who has not voted on or skipped it gets it";
    more.addEventListener("click", () =>
      act(() => api("/api/lead/ask-more", { item_index: item.item_index }),
        "Item " + item.item_index + ": one more vote asked for."));
    settle.append(more);
    card.append(settle);
    return card;
  }

  function renderItems(id, items, mode) {
    const box = $(id);
    box.replaceChildren();
    for (const item of items) box.append(renderItem(item, mode));
    $(id + "-none").hidden = items.length > 0;
  }

  function show(data) {
    const p = data.progress;
    $("mode").textContent = "Mode: " + data.mode + " \u00b7 " + data.overlap + " vote" + (data.overlap === 1 ? "" : "s") + " each";
    $("progress-text").textContent = p.complete + "/" + p.items + " complete \u00b7 " + p.waiting + " waiting \u00b7 " +
      p.stuck + " stuck \u00b7 " + p.settled_by_lead + " settled by you \u00b7 " + p.votes + " votes, " + p.last_hour + " labels in the last hour" +
      (p.check_questions ? " \u00b7 " + p.check_questions + " check questions (not exported)" : "");
    $("progress-bar").max = Math.max(p.items, 1);
    $("progress-bar").value = p.complete;
    renderAnnotators(data.annotators);
    renderAgreement(data.agreement);
    renderItems("stuck", data.stuck, data.mode);
    renderItems("split", data.split, data.mode);
    $("overview").hidden = false;
  }

  async function act(call, note) {
    if (busy || token === null) return;
    busy = true;
    for (const button of document.querySelectorAll("button")) button.disabled = true;
    try {
      const data = await call();
      show(data.overview || data);
      if (data.token) {
        const link = location.origin + "/#token=" + data.token;
        $("new-link").textContent = data.name + "'s link (shown only now): " + link;
        $("new-link").hidden = false;
      }
      say(note, false);
    } catch (error) {
      say("Not done: " + error.message, true);
    } finally {
      busy = false;
      for (const button of document.querySelectorAll("button")) button.disabled = false;
    }
  }

  function start() {
    token = readToken();
    $("add-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const name = $("new-name").value.trim();
      if (name) act(() => api("/api/lead/add-annotator", { name: name }), name + " added.");
    });
    if (token === null) {
      say("No lead token: open the link from `rlhfkit annotate lead-token` (it ends in #token=...).", true);
      return;
    }
    act(() => api("/api/lead/overview"), "");
  }

  start();
})();
