// What the annotator page (annotate.js) and the lead's page (lead.js) share: the token from the
// page URL, the API call, the status line and element creation. Loaded before either script;
// it exposes window.rlhfkitCommon and touches nothing else. No framework, no build step.
//
// A token comes from the page URL (#token=..., or ?token=... where the page allows it), is kept in
// sessionStorage under the page's own key (an annotator's and the lead's token in one browser do
// not meet) and is removed from the address bar, so it is not in the history or a screenshot.
"use strict";

(function () {
  function el(tag, className, text) {
    const node = document.createElement(tag); // tag: always one of the callers' literals
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function readToken(storageKey, allowQuery) {
    const fromUrl = new URLSearchParams(location.hash.slice(1)).get("token") ||
      (allowQuery ? new URLSearchParams(location.search).get("token") : null);
    if (fromUrl) {
      sessionStorage.setItem(storageKey, fromUrl);
      history.replaceState(null, "", location.pathname);
    }
    return sessionStorage.getItem(storageKey);
  }

  // POST `body` as JSON with the token; the parsed reply, or an Error carrying the server's `detail`
  // (`on401`, when given, is added to a 401's message: what the person should do about it).
  async function api(token, path, body, on401) {
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
      if (response.status === 401 && on401) detail += on401;
      throw new Error(detail);
    }
    return data;
  }

  // The page's status line (#message): an error stays visible (.error) until the next message.
  function say(text, isError) {
    const box = document.getElementById("message");
    box.textContent = text;
    box.classList.toggle("error", Boolean(isError));
    box.hidden = !text;
  }

  window.rlhfkitCommon = Object.freeze({ el: el, readToken: readToken, api: api, say: say });
})();
