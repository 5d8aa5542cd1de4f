// The annotator page of `rlhfkit annotate serve`. No framework, no build step.
//
// Model text (prompt and responses) is only ever inserted with textContent, so
// markup in it is shown as text and never runs. The token comes from the page
// URL (#token=... or ?token=...), is kept in sessionStorage (a reload keeps
// working), removed from the address bar, and sent as a header on every call.
// A #token= link pasted into an open tab takes effect at once (hashchange).
//
// Text blocks (prompt, each chat turn, responses, reason) have dir="auto", so
// Arabic, Hebrew or Persian text is laid out right to left.
"use strict";

(function () {
  const TOKEN_KEY = "rlhfkit-annotate-token";
  const KEYS = { "1": "a", "a": "a", "2": "b", "b": "b", "3": "tie", "t": "tie", "s": "skip" };
  // The "done" page asks again this often while pairs it could get are open in other annotators'
  // tabs: an abandoned tab's reservation runs out and the pair comes back without a reload.
  const RECHECK_MS = 15000;
  const $ = (id) => document.getElementById(id);

  let token = null;
  let current = null; // the assignment on screen: {pair_id, prompt, a, b}
  let busy = false; // one request at a time: key repeat must not label two pairs
  let reloadWanted = false; // a new token arrived while a request was in flight
  let recheckTimer = null;

  function readToken() {
    const fromUrl = new URLSearchParams(location.hash.slice(1)).get("token") ||
      new URLSearchParams(location.search).get("token");
    if (fromUrl) {
      sessionStorage.setItem(TOKEN_KEY, fromUrl);
      history.replaceState(null, "", location.pathname);
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  async function api(path, body) {
    const response = await fetch(path, {
      method: "POST",
      headers: { "Authorization": "Bearer " + token, "Content-Type": "application/json" },
      body: JSON.stringify(body || {}),
      cache: "no-store",
      credentials: "omit",
    });
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      let detail = data && data.detail;
      if (typeof detail !== "string") detail = response.status + " " + response.statusText;
      if (response.status === 401) detail += ". Open the link you were given again, or ask for a new one.";
      throw new Error(detail);
    }
    return data;
  }

  function say(text, isError) {
    const box = $("message");
    box.textContent = text;
    box.classList.toggle("error", Boolean(isError));
    box.hidden = !text;
  }

  function renderPrompt(prompt) {
    const box = $("prompt");
    box.replaceChildren();
    if (typeof prompt === "string") {
      box.textContent = prompt;
      return;
    }
    for (const message of prompt) {
      const turn = document.createElement("div");
      turn.className = "turn";
      // dir="auto" takes the turn's direction from its content: the role label has its own
      // dir, and the direction algorithm skips elements with one.
      turn.dir = "auto";
      const role = document.createElement("strong");
      role.dir = "ltr";
      role.textContent = message.role.charAt(0).toUpperCase() + message.role.slice(1) + ":";
      const content = document.createElement("span");
      content.textContent = message.content;
      turn.append(role, " ", content); // the space outside the label: between label and text in either direction
      box.append(turn);
    }
  }

  function renderProgress(p) {
    const mine = p.labelled + p.skipped;
    $("progress-text").textContent =
      p.labelled + " labelled by you, " + p.remaining + " left for you \u00b7 " +
      p.pairs_complete + "/" + p.pairs_total + " pairs complete (" + p.overlap + " vote" + (p.overlap === 1 ? "" : "s") + " each)";
    const bar = $("progress-bar");
    bar.max = Math.max(mine + p.remaining, 1);
    bar.value = mine;
  }

  function show(data) {
    $("who").textContent = "Annotator: " + data.annotator;
    renderProgress(data.progress);
    const before = current === null ? null : current.pair_id;
    current = data.assignment;
    for (const button of document.querySelectorAll("button.previous")) button.classList.remove("previous");
    $("task").hidden = current === null;
    $("done").hidden = current !== null;
    if ((current === null ? null : current.pair_id) !== before) window.scrollTo(0, 0); // a new pair opens at its top
    clearTimeout(recheckTimer);
    recheckTimer = null;
    if (current === null) {
      const waiting = data.progress.remaining;
      $("done-waiting").hidden = waiting === 0;
      $("done-waiting").textContent = waiting === 0 ? "" :
        waiting + (waiting === 1 ? " pair still needs a vote but is" : " pairs still need votes but are") +
        " open in another annotator's tab. If that tab was left, its pair comes back to you when the " +
        "reservation runs out; this page checks every " + RECHECK_MS / 1000 + " seconds.";
      if (waiting > 0) recheckTimer = setTimeout(recheck, RECHECK_MS);
      return;
    }
    renderPrompt(current.prompt);
    $("response-a").textContent = current.a;
    $("response-b").textContent = current.b;
    $("reason").value = "";
    if (data.undone) {
      $("reason").value = data.undone.reason;
      const previous = document.querySelector('button[data-choice="' + data.undone.choice + '"]');
      if (previous) previous.classList.add("previous");
    }
  }

  // note(data): the message to show after success (null: leave the message as it is).
  // quiet: a background call; a failure is not shown, the recheck just tries again later.
  async function act(call, note, quiet) {
    if (busy || token === null) return;
    busy = true;
    for (const button of document.querySelectorAll("button")) button.disabled = true;
    try {
      const data = await call();
      show(data);
      const text = note(data);
      if (text !== null) say(text, false);
    } catch (error) {
      if (quiet) recheckTimer = setTimeout(recheck, RECHECK_MS);
      else say("Not saved: " + error.message, true); // #message.error is sticky: visible however far down
    } finally {
      busy = false;
      for (const button of document.querySelectorAll("button")) button.disabled = false;
      if (reloadWanted) {
        reloadWanted = false;
        loadNext();
      }
    }
  }

  function loadNext() {
    act(() => api("/api/next"), () => "");
  }

  function recheck() {
    recheckTimer = null;
    if (current === null && !busy) act(() => api("/api/next"), () => null, true);
  }

  // A #token= link pasted into this tab: act as that annotator from now on, no reload needed.
  function onHashChange() {
    const fresh = readToken();
    if (fresh === null || fresh === token) return;
    token = fresh;
    current = null;
    say("", false);
    if (busy) reloadWanted = true; // the reply in flight is the old annotator's; ask again after it
    else loadNext();
  }

  const NAMES = { a: "A is better", b: "B is better", tie: "tie", skip: "skipped" };

  function choose(choice) {
    if (current === null) return;
    const body = { pair_id: current.pair_id, choice: choice, reason: $("reason").value.trim() };
    act(() => api("/api/label", body), () => "Saved: " + NAMES[choice] + ".");
  }

  function undo() {
    act(() => api("/api/undo"), (data) => "Undone (you had chosen: " + NAMES[data.undone.choice] + "). Choose again.");
  }

  function onKey(event) {
    const reason = $("reason");
    if (event.target === reason) {
      if (event.key === "Enter" || event.key === "Escape") {
        event.preventDefault();
        reason.blur();
      }
      return; // typing a reason: letters are text, not shortcuts
    }
    if (event.ctrlKey || event.metaKey) {
      if (event.key.toLowerCase() === "z") {
        event.preventDefault();
        undo();
      }
      return;
    }
    if (event.altKey || event.repeat) return;
    const key = event.key.toLowerCase();
    if (key === "u") {
      event.preventDefault();
      undo();
    } else if (key === "r" && current !== null) {
      event.preventDefault(); // focus without typing the "r"
      reason.focus();
    } else if (key in KEYS) {
      event.preventDefault();
      choose(KEYS[key]);
    }
  }

  function start() {
    token = readToken();
    for (const button of document.querySelectorAll("button[data-choice]")) {
      button.addEventListener("click", () => choose(button.dataset.choice));
    }
    $("undo").addEventListener("click", undo);
    $("undo-done").addEventListener("click", undo);
    document.addEventListener("keydown", onKey);
    window.addEventListener("hashchange", onHashChange);
    if (token === null) {
      say("No token: open the link you were given (it ends in #token=...).", true);
      return;
    }
    loadNext();
  }

  start();
})();
