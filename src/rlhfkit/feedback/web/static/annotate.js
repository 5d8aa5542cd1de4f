// The annotator page of `rlhfkit annotate serve`. No framework, no build step.
//
// Text is never parsed as HTML. Model text (prompt and responses) and the guidelines
// are rendered as markdown by the small renderer below (headings, lists, emphasis,
// inline code, fenced code blocks, tables, block quotes): it creates elements from a
// fixed list of tags and puts every piece of text in as a text node, so markup in the
// text (<script>, <img onerror>, raw HTML of any kind) is shown as text and never runs.
// Links and images are not rendered: their markdown stays text. "Plain text" shows the
// model text exactly as written.
//
// The token comes from the page URL (#token=... or ?token=...), is kept in
// sessionStorage (a reload keeps working), removed from the address bar, and sent as a
// header on every call (common.js, shared with the lead's page). A #token= link pasted into an open tab takes effect at once
// (hashchange).
//
// Text blocks (prompt, each chat turn, responses, each rendered paragraph, list item,
// heading and table, the reason) have dir="auto", so Arabic, Hebrew or Persian text is
// laid out right to left; code blocks stay left to right.
//
// Thumbs mode (`serve --mode thumbs`, told by every reply's `mode`): one response per task,
// 👍 (ArrowUp / y) or 👎 (ArrowDown / n); the pair's scale, "both bad" and its keys are off.
//
// The lead's page (/lead) loads this file too, for the renderer only (window.rlhfkitRender):
// the annotator page starts only where its #task section exists.
"use strict";

(function () {
  const TOKEN_KEY = "rlhfkit-annotate-token";
  const PLAIN_KEY = "rlhfkit-annotate-plain";
  const GUIDELINES_KEY = "rlhfkit-annotate-guidelines-open";
  // key -> [choice as shown, grade]. "A/B better" and tie keep their old keys.
  const KEYS = {
    "1": ["a", "better"], "a": ["a", "better"], "z": ["a", "slightly_better"],
    "3": ["tie", null], "t": ["tie", null],
    "v": ["b", "slightly_better"], "2": ["b", "better"], "b": ["b", "better"],
    "s": ["skip", null],
  };
  const SHIFTED = { "a": ["a", "much_better"], "b": ["b", "much_better"] }; // Shift+A, Shift+B
  const THUMBS = "thumbs"; // the mode name the server sends (store.MODE_THUMBS)
  // Thumbs mode: key -> choice. The pair keys (a, b, 1, 2, t...) mean nothing there.
  const THUMB_KEYS = { "arrowup": "up", "y": "up", "+": "up", "arrowdown": "down", "n": "down", "-": "down", "s": "skip" };
  const THUMB_WORDS = { up: "\u{1F44D} good", down: "\u{1F44E} bad" };
  const STRENGTH_WORDS = { much_better: "much better", better: "better", slightly_better: "slightly better" };
  // The "done" page asks again this often while pairs it could get are open in other annotators'
  // tabs: an abandoned tab's reservation runs out and the pair comes back without a reload.
  const RECHECK_MS = 15000;
  const $ = (id) => document.getElementById(id);

  let token = null;
  let current = null; // the assignment on screen: {pair_id, prompt, a, b}
  let busy = false; // one request at a time: key repeat must not label two pairs
  let reloadWanted = false; // a new token arrived while a request was in flight
  let recheckTimer = null;
  let bothBad = false; // the "Both are bad" toggle, sent with the next vote
  let plain = localStorage.getItem(PLAIN_KEY) === "1";
  let taskLoadedFor = null; // the token whose guidelines are on the page
  let mode = "pairs";

  // ------------------------------------------------------------------ markdown, safely

  const MAX_BLOCK_DEPTH = 6; // nested lists / quotes deeper than this are shown as text
  const MAX_INLINE_DEPTH = 6;
  const FENCE = /^ {0,3}(`{3,}|~{3,})(.*)$/;
  const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
  const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  const QUOTE = /^ {0,3}>/;
  const BULLET = /^([ \t]*)([-*+])([ \t]+)(\S.*)$/;
  const ORDERED = /^([ \t]*)(\d{1,9})([.)])([ \t]+)(\S.*)$/;
  const DELIMITER_ROW = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;
  const PUNCTUATION = /[!-\/:-@\[-`{-~]/;
  const WORD = /[\p{L}\p{N}]/u;

  const common = window.rlhfkitCommon; // common.js: el, readToken, api, say
  const el = common.el;
  const say = common.say;

  function blank(line) { return /^[ \t]*$/.test(line); }

  // Columns of leading whitespace (a tab runs to the next multiple of 4).
  function indentOf(line) {
    let col = 0;
    for (const c of line) {
      if (c === " ") col += 1;
      else if (c === "\t") col += 4 - (col % 4);
      else break;
    }
    return col;
  }

  // The line without its first `n` columns of leading whitespace.
  function dedent(line, n) {
    let col = 0, i = 0;
    while (i < line.length && col < n && (line[i] === " " || line[i] === "\t")) {
      col += line[i] === "\t" ? 4 - (col % 4) : 1;
      i += 1;
    }
    return " ".repeat(Math.max(col - n, 0)) + line.slice(i);
  }

  function listItemStart(line) {
    let m = BULLET.exec(line);
    let ordered = false;
    if (!m) {
      m = ORDERED.exec(line);
      ordered = true;
    }
    if (!m) return null;
    const indent = indentOf(m[1]);
    if (indent > 3) return null;
    const marker = ordered ? m[2] + m[3] : m[2];
    const rest = ordered ? m[5] : m[4];
    const gap = ordered ? m[4] : m[3];
    let spaces = 0; // columns of the gap after the marker (a tab runs to the next multiple of 4)
    for (const c of gap) spaces += c === "\t" ? 4 - ((indent + marker.length + spaces) % 4) : 1;
    // 1-4 spaces after the marker: the content starts there; more: it starts after one.
    const offset = indent + marker.length + (spaces > 4 ? 1 : spaces);
    const text = spaces > 4 ? " ".repeat(spaces - 1) + rest : rest;
    return { ordered: ordered, bullet: ordered ? m[3] : m[2], start: ordered ? parseInt(m[2], 10) : 1, offset: offset, text: text };
  }

  function splitRow(line) {
    let row = line.trim();
    if (row.startsWith("|")) row = row.slice(1);
    if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
    const cells = [];
    let cell = "";
    for (let i = 0; i < row.length; i++) {
      if (row[i] === "\\" && row[i + 1] === "|") { cell += "|"; i += 1; }
      else if (row[i] === "|") { cells.push(cell.trim()); cell = ""; }
      else cell += row[i];
    }
    cells.push(cell.trim());
    return cells;
  }

  function tableStart(lines, i) {
    if (i + 1 >= lines.length || !lines[i].includes("|") || !lines[i + 1].includes("|")) return false;
    if (!DELIMITER_ROW.test(lines[i + 1]) || indentOf(lines[i]) > 3) return false;
    return splitRow(lines[i]).length === splitRow(lines[i + 1]).length;
  }

  // Does line i start a block that ends a paragraph?
  function interrupts(lines, i) {
    const line = lines[i];
    if (blank(line) || FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line)) return true;
    const item = listItemStart(line);
    if (item && (!item.ordered || item.start === 1)) return true; // "2019. was a year" mid-sentence is text
    return tableStart(lines, i);
  }

  // Lines -> a list of blocks: {type: "p"|"h"|"code"|"hr"|"quote"|"list"|"table", ...}.
  function parseBlocks(lines, depth) {
    const blocks = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      if (blank(line)) { i += 1; continue; }
      let m = FENCE.exec(line);
      if (m && !(m[1][0] === "`" && m[2].includes("`"))) {
        const fence = m[1];
        const indent = indentOf(line);
        const body = [];
        i += 1;
        while (i < lines.length) {
          const close = /^ {0,3}(`{3,}|~{3,})[ \t]*$/.exec(lines[i]);
          if (close && close[1][0] === fence[0] && close[1].length >= fence.length) { i += 1; break; }
          body.push(dedent(lines[i], indent));
          i += 1;
        }
        blocks.push({ type: "code", text: body.join("\n"), lang: m[2].trim().split(/\s+/)[0] });
        continue;
      }
      m = HEADING.exec(line);
      if (m) { blocks.push({ type: "h", level: m[1].length, text: m[2] || "" }); i += 1; continue; }
      if (RULE.test(line)) { blocks.push({ type: "hr" }); i += 1; continue; }
      if (QUOTE.test(line) && depth < MAX_BLOCK_DEPTH) {
        const inner = [];
        while (i < lines.length && QUOTE.test(lines[i])) {
          inner.push(lines[i].replace(/^ {0,3}> ?/, ""));
          i += 1;
        }
        blocks.push({ type: "quote", blocks: parseBlocks(inner, depth + 1) });
        continue;
      }
      const first = listItemStart(line);
      if (first && depth < MAX_BLOCK_DEPTH) {
        const items = [];
        let item = first;
        while (item) {
          const body = [item.text];
          i += 1;
          while (i < lines.length) {
            const next = lines[i];
            if (blank(next)) {
              let j = i;
              while (j < lines.length && blank(lines[j])) j += 1;
              if (j < lines.length && indentOf(lines[j]) >= item.offset) {
                for (; i < j; i++) body.push("");
                continue;
              }
              break;
            }
            if (indentOf(next) >= item.offset) { body.push(dedent(next, item.offset)); i += 1; continue; }
            if (listItemStart(next) || interrupts(lines, i)) break;
            body.push(next.trim()); // a lazy continuation of the item's paragraph
            i += 1;
          }
          items.push(parseBlocks(body, depth + 1));
          // The next item of the same list, perhaps after blank lines.
          let j = i;
          while (j < lines.length && blank(lines[j])) j += 1;
          const next = j < lines.length ? listItemStart(lines[j]) : null;
          if (next && next.ordered === first.ordered && next.bullet === first.bullet) {
            i = j;
            item = next;
          } else {
            item = null;
          }
        }
        blocks.push({ type: "list", ordered: first.ordered, start: first.start, items: items });
        continue;
      }
      if (tableStart(lines, i)) {
        const head = splitRow(line);
        const align = splitRow(lines[i + 1]).map((cell) =>
          cell.startsWith(":") && cell.endsWith(":") ? "center" : cell.endsWith(":") ? "right" : cell.startsWith(":") ? "left" : "");
        const rows = [];
        i += 2;
        while (i < lines.length && !blank(lines[i]) && lines[i].includes("|") && !FENCE.test(lines[i]) && !QUOTE.test(lines[i])) {
          rows.push(splitRow(lines[i]));
          i += 1;
        }
        blocks.push({ type: "table", head: head, align: align, rows: rows });
        continue;
      }
      const text = [line];
      i += 1;
      while (i < lines.length && !interrupts(lines, i)) {
        text.push(lines[i]);
        i += 1;
      }
      blocks.push({ type: "p", text: text.join("\n") });
    }
    return blocks;
  }

  // Length of the run of `c` at position i.
  function runLength(text, i, c) {
    let j = i;
    while (text[j] === c) j += 1;
    return j - i;
  }

  // Where a code span opened by `k` backticks closes (the start of exactly `k` backticks), or -1.
  function codeClose(text, from, k, failed) {
    const key = "`" + k;
    if (failed[key] !== undefined && from >= failed[key]) return -1;
    let j = from;
    while (j < text.length) {
      if (text[j] === "`") {
        const r = runLength(text, j, "`");
        if (r === k) return j;
        j += r;
      } else {
        j += 1;
      }
    }
    failed[key] = Math.min(failed[key] === undefined ? Infinity : failed[key], from);
    return -1;
  }

  function isSpace(ch) { return ch === undefined || /\s/.test(ch); }
  function isPunctuation(ch) { return ch !== undefined && /[\p{P}\p{S}]/u.test(ch); }

  // Can the run of `c` at i..i+r open emphasis? Followed by a non-space, and not glued to a
  // word on its left unless it is "*" (snake_case_names stay as they are).
  function canOpen(text, i, r, c) {
    const before = text[i - 1];
    const after = text[i + r];
    if (isSpace(after)) return false;
    if (c === "_" && before !== undefined && WORD.test(before)) return false;
    return true;
  }

  // A run that opens and cannot close (space or punctuation before it): nested emphasis inside.
  function opensOnly(text, i, r) {
    const before = text[i - 1];
    return !isSpace(text[i + r]) && (isSpace(before) || isPunctuation(before));
  }

  // Where emphasis with delimiter c (size 1 or 2) opened before `from` closes, or -1.
  // Returns the start of the closing delimiter (the last `size` characters of a run).
  // Emphasis opened inside (a run with a space before it) is skipped over whole, so
  // "*a **b** c*" closes at the last "*". `failed` remembers where a search came up empty:
  // a later search from further on cannot do better, which keeps long text linear.
  function emphasisClose(text, from, c, size, failed, depth) {
    const key = c + size + ":" + depth;
    if (failed[key] !== undefined && from >= failed[key]) return -1;
    let j = from;
    while (j < text.length) {
      const ch = text[j];
      if (ch === "\\") { j += 2; continue; }
      if (ch === "`") {
        const k = runLength(text, j, "`");
        const end = codeClose(text, j + k, k, failed);
        j = end < 0 ? j + k : end + k;
        continue;
      }
      if (ch === c) {
        const r = runLength(text, j, c);
        if (depth < MAX_INLINE_DEPTH && opensOnly(text, j, r)) {
          const inner = c === "~" ? (r === 2 ? 2 : 0) : Math.min(r, 2);
          const end = inner ? emphasisClose(text, j + r, c, inner, failed, depth + 1) : -1;
          j = end < 0 ? j + r : end + inner;
          continue;
        }
        const after = text[j + r];
        const closes = r >= size && j > from && !isSpace(text[j - 1]) && !(c === "_" && after !== undefined && WORD.test(after));
        if (closes) return j + r - size;
        j += r;
        continue;
      }
      j += 1;
    }
    failed[key] = Math.min(failed[key] === undefined ? Infinity : failed[key], from);
    return -1;
  }

  const EMPHASIS = { "*": ["strong", "em"], "_": ["strong", "em"], "~": ["del", null] };

  // Inline markdown of `text` appended to `parent`: code spans, strong, emphasis, strikethrough,
  // backslash escapes. Everything else (HTML, links, images) stays text.
  function renderInline(parent, text, depth) {
    const failed = {};
    let buffer = "";
    const flush = () => {
      if (buffer) parent.append(document.createTextNode(buffer));
      buffer = "";
    };
    let i = 0;
    while (i < text.length) {
      const c = text[i];
      if (c === "\\" && i + 1 < text.length && PUNCTUATION.test(text[i + 1])) {
        buffer += text[i + 1];
        i += 2;
        continue;
      }
      if (c === "`") {
        const k = runLength(text, i, "`");
        const end = codeClose(text, i + k, k, failed);
        if (end < 0) {
          buffer += text.slice(i, i + k);
          i += k;
          continue;
        }
        let body = text.slice(i + k, end).replace(/\n/g, " ");
        if (body.length > 2 && body.startsWith(" ") && body.endsWith(" ") && body.trim()) body = body.slice(1, -1);
        flush();
        const code = el("code");
        code.textContent = body;
        parent.append(code);
        i = end + k;
        continue;
      }
      if (c in EMPHASIS && depth < MAX_INLINE_DEPTH) {
        const k = runLength(text, i, c);
        const sizes = c === "~" ? (k === 2 ? [2] : []) : k >= 2 ? [2, 1] : [1];
        let done = false;
        for (const size of canOpen(text, i, k, c) ? sizes : []) {
          const close = emphasisClose(text, i + k, c, size, failed, 0);
          if (close < 0 || close <= i + size) continue;
          const tag = EMPHASIS[c][size === 2 ? 0 : 1];
          flush();
          const node = el(tag);
          renderInline(node, text.slice(i + size, close), depth + 1);
          parent.append(node);
          i = close + size;
          done = true;
          break;
        }
        if (!done) {
          buffer += text.slice(i, i + k);
          i += k;
        }
        continue;
      }
      buffer += c;
      i += 1;
    }
    flush();
  }

  function renderBlock(block, depth) {
    switch (block.type) {
      case "p": {
        const p = el("p");
        p.dir = "auto";
        renderInline(p, block.text, 0);
        return p;
      }
      case "h": {
        const h = el("h" + block.level);
        h.dir = "auto";
        renderInline(h, block.text, 0);
        return h;
      }
      case "hr":
        return el("hr");
      case "code": {
        const pre = el("pre");
        pre.dir = "ltr";
        const code = el("code");
        code.textContent = block.text;
        pre.append(code);
        return pre;
      }
      case "quote": {
        const quote = el("blockquote");
        quote.dir = "auto";
        appendBlocks(quote, block.blocks, depth + 1);
        return quote;
      }
      case "list": {
        const list = el(block.ordered ? "ol" : "ul");
        list.dir = "auto";
        if (block.ordered && block.start !== 1) list.start = block.start;
        for (const item of block.items) {
          const li = el("li");
          if (item.length === 1 && item[0].type === "p") renderInline(li, item[0].text, 0); // a tight item
          else appendBlocks(li, item, depth + 1);
          list.append(li);
        }
        return list;
      }
      case "table": {
        const wrap = el("div", "table-wrap"); // scrolls sideways on a narrow screen
        const table = el("table");
        table.dir = "auto";
        const row = (cells, tag) => {
          const tr = el("tr");
          block.head.forEach((_, index) => {
            const cell = el(tag, block.align[index] ? "align-" + block.align[index] : "");
            renderInline(cell, cells[index] || "", 0);
            tr.append(cell);
          });
          return tr;
        };
        const thead = el("thead");
        thead.append(row(block.head, "th"));
        const tbody = el("tbody");
        for (const cells of block.rows) tbody.append(row(cells, "td"));
        table.append(thead, tbody);
        wrap.append(table);
        return wrap;
      }
    }
    return document.createTextNode("");
  }

  function appendBlocks(parent, blocks, depth) {
    for (const block of blocks) parent.append(renderBlock(block, depth));
  }

  // `text` as markdown into `box` (emptied first). A single paragraph goes in as inline
  // content with no <p> around it, so plain text looks (and reads) exactly as written;
  // line breaks are kept by the box's white-space: pre-wrap. Returns true when it did that.
  function renderMarkdown(box, text) {
    box.replaceChildren();
    const blocks = parseBlocks(String(text).replace(/\r\n?/g, "\n").split("\n"), 0);
    if (blocks.length === 1 && blocks[0].type === "p") {
      renderInline(box, blocks[0].text, 0);
      return true;
    }
    appendBlocks(box, blocks, 0);
    return false;
  }

  function renderText(box, text) {
    if (plain) {
      box.replaceChildren();
      box.textContent = text;
      return true;
    }
    return renderMarkdown(box, text);
  }

  // ------------------------------------------------------------------ talking to the server

  function readToken() { return common.readToken(TOKEN_KEY, true); }

  function api(path, body) {
    return common.api(token, path, body, ". Open the link you were given again, or ask for a new one.");
  }

  // ------------------------------------------------------------------ the page

  function renderPrompt(prompt, into) {
    const box = into || $("prompt");
    box.replaceChildren();
    if (typeof prompt === "string") {
      renderText(box, prompt);
      return;
    }
    for (const message of prompt) {
      const turn = el("div", "turn");
      // dir="auto" takes the turn's direction from its content: the role label has its own
      // dir, and the direction algorithm skips elements with one.
      turn.dir = "auto";
      const role = el("strong", "role");
      role.dir = "ltr";
      role.textContent = message.role.charAt(0).toUpperCase() + message.role.slice(1) + ":";
      const content = el("span");
      if (renderText(content, message.content)) {
        turn.append(role, " ", content); // the space outside the label: between label and text in either direction
      } else {
        const body = el("div", "turn-body");
        body.dir = "auto";
        body.append(...content.childNodes);
        turn.append(role, body);
      }
      box.append(turn);
    }
  }

  function renderResponses() {
    if (current === null) return;
    renderPrompt(current.prompt);
    if (mode === THUMBS) {
      renderText($("response-a"), current.response);
      $("response-b").replaceChildren();
      return;
    }
    renderText($("response-a"), current.a);
    renderText($("response-b"), current.b);
  }

  function setMode(next) {
    mode = next === THUMBS ? THUMBS : "pairs";
    const thumbs = mode === THUMBS;
    document.body.classList.toggle("mode-thumbs", thumbs);
    $("title").textContent = thumbs ? "Is this response good?" : "Which response is better?";
    $("card-a-title").textContent = thumbs ? "Response" : "Response A";
  }

  function renderTask(task) {
    const guidelines = (task && task.guidelines) || "";
    const criteria = (task && task.criteria) || [];
    const details = $("guidelines");
    details.hidden = !guidelines.trim();
    if (guidelines.trim()) {
      renderMarkdown($("guidelines-text"), guidelines);
      // Open until the annotator closes it; then as they left it, for this tab.
      details.open = sessionStorage.getItem(GUIDELINES_KEY) !== "0";
    }
    const list = $("criteria-list");
    list.replaceChildren();
    for (const criterion of criteria) {
      const item = el("li");
      item.dir = "auto";
      item.textContent = criterion;
      list.append(item);
    }
    $("criteria").hidden = criteria.length === 0;
    $("brief").hidden = !guidelines.trim() && criteria.length === 0;
  }

  async function loadTask() {
    if (token === null || taskLoadedFor === token) return;
    const asked = token;
    try {
      const task = await api("/api/task");
      if (asked !== token) return;
      renderTask(task);
      taskLoadedFor = asked;
    } catch (error) {
      // The pair's own call reports a bad token; the guidelines are asked for again with the next pair.
    }
  }

  function renderProgress(p) {
    const mine = p.labelled + p.skipped;
    $("progress-text").textContent =
      p.labelled + " labelled by you, " + p.remaining + " left for you \u00b7 " +
      p.pairs_complete + "/" + p.pairs_total + (mode === THUMBS ? " responses" : " pairs") + " complete (" + p.overlap + " vote" + (p.overlap === 1 ? "" : "s") + " each)";
    const bar = $("progress-bar");
    bar.max = Math.max(mine + p.remaining, 1);
    bar.value = mine;
  }

  function setBothBad(on) {
    bothBad = on;
    $("both-bad").setAttribute("aria-pressed", on ? "true" : "false");
  }

  function show(data) {
    setMode(data.mode);
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
    loadTask();
    $("done-title").textContent = data.paused ? "You are paused by the lead." : "Nothing left for you to label. Thank you!";
    if (current === null) {
      const waiting = data.paused ? 0 : data.progress.remaining;
      $("done-waiting").hidden = waiting === 0;
      $("done-waiting").textContent = waiting === 0 ? "" :
        waiting + (waiting === 1 ? " pair still needs a vote but is" : " pairs still need votes but are") +
        " open in another annotator's tab. If that tab was left, its pair comes back to you when the " +
        "reservation runs out; this page checks every " + RECHECK_MS / 1000 + " seconds.";
      if (waiting > 0) recheckTimer = setTimeout(recheck, RECHECK_MS);
      return;
    }
    renderResponses();
    $("reason").value = "";
    setBothBad(false);
    if (data.undone) {
      const undone = data.undone;
      $("reason").value = undone.reason;
      setBothBad(Boolean(undone.both_bad));
      // An ungraded a/b vote (from an older client) is shown on the "better" button.
      const grade = undone.choice === "a" || undone.choice === "b" ? undone.grade || "better" : null;
      const selector = 'button[data-choice="' + undone.choice + '"]' + (grade ? '[data-grade="' + grade + '"]' : "");
      const previous = document.querySelector(selector);
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
    act(() => api("/api/next"), (data) => (data.paused ? data.message : ""));
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

  function describe(choice, grade, both) {
    let text;
    if (choice === "skip") text = "skipped";
    else if (choice in THUMB_WORDS) return THUMB_WORDS[choice];
    else if (choice === "tie") text = "tie";
    else text = choice.toUpperCase() + " " + (STRENGTH_WORDS[grade] || "is better");
    return both && choice !== "skip" ? text + ", both bad" : text;
  }

  function choose(choice, grade) {
    if (current === null) return;
    const body = { pair_id: current.pair_id, choice: choice, reason: $("reason").value.trim() };
    if (grade) body.grade = grade;
    const both = bothBad && choice !== "skip";
    if (both) body.both_bad = true;
    act(() => api("/api/label", body), () => "Saved: " + describe(choice, grade, both) + ".");
  }

  function undo() {
    act(() => api("/api/undo"), (data) =>
      "Undone (you had chosen: " + describe(data.undone.choice, data.undone.grade, data.undone.both_bad) + "). Choose again.");
  }

  function togglePlain() {
    plain = $("plain").checked;
    localStorage.setItem(PLAIN_KEY, plain ? "1" : "0");
    renderResponses();
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
    if (mode === THUMBS) {
      if (key === "u") {
        event.preventDefault();
        undo();
      } else if (key === "r" && current !== null) {
        event.preventDefault();
        reason.focus();
      } else if (key in THUMB_KEYS) {
        event.preventDefault(); // the arrows would scroll the page
        choose(THUMB_KEYS[key], null);
      }
      return;
    }
    if (event.shiftKey && key in SHIFTED) {
      event.preventDefault();
      choose(SHIFTED[key][0], SHIFTED[key][1]);
    } else if (key === "u") {
      event.preventDefault();
      undo();
    } else if (key === "r" && current !== null) {
      event.preventDefault(); // focus without typing the "r"
      reason.focus();
    } else if (key === "x" && current !== null) {
      event.preventDefault();
      setBothBad(!bothBad);
    } else if (key in KEYS) {
      event.preventDefault();
      choose(KEYS[key][0], KEYS[key][1]);
    }
  }

  function start() {
    token = readToken();
    for (const button of document.querySelectorAll("button[data-choice]")) {
      button.addEventListener("click", () => choose(button.dataset.choice, button.dataset.grade || null));
    }
    $("both-bad").addEventListener("click", () => setBothBad(!bothBad));
    $("undo").addEventListener("click", undo);
    $("undo-done").addEventListener("click", undo);
    $("plain").checked = plain;
    $("plain").addEventListener("change", togglePlain);
    $("guidelines").addEventListener("toggle", () => {
      if (!$("guidelines").hidden) sessionStorage.setItem(GUIDELINES_KEY, $("guidelines").open ? "1" : "0");
    });
    document.addEventListener("keydown", onKey);
    window.addEventListener("hashchange", onHashChange);
    if (token === null) {
      say("No token: open the link you were given (it ends in #token=...).", true);
      return;
    }
    loadNext();
  }

  // For the lead's page: the same renderer, nothing else.
  window.rlhfkitRender = Object.freeze({
    markdown: renderMarkdown,
    prompt: (box, prompt) => renderPrompt(prompt, box),
  });
  if ($("task")) start();
})();
