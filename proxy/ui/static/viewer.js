/* TokenTrail viewer: plain JavaScript, no build step, no third-party code.
 *
 * Two views behind the URL's hash: "#/?filters" lists trajectories (paging on the API's cursor) and
 * "#/t/<id>" shows one: its calls and its merged training sequence token by token. Everything comes
 * from /tokentrail/v1/ with the API key the user typed, kept in this tab's sessionStorage.
 * Text from the records is only ever put into the page with textContent, never parsed as HTML.
 */
"use strict";

(() => {
  const API = "/tokentrail/v1";
  const KEY = "tokentrail.apiKey";
  const PAGE = 50;
  const main = document.getElementById("main");
  const statusLine = document.getElementById("status");
  const keyForm = document.getElementById("key-form");
  const forgetKey = document.getElementById("forget-key");
  const NONE = "—";

  class AuthError extends Error {}

  // ---- small helpers ----

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setStatus(text, error) {
    statusLine.textContent = text || "";
    statusLine.classList.toggle("error", Boolean(error));
  }

  function show(value) {
    return value === undefined || value === null || value === "" ? NONE : String(value);
  }

  function when(iso) {
    if (!iso) return NONE;
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
  }

  function tagsText(tags) {
    const entries = Object.entries(tags || {});
    return entries.length ? entries.map(([k, v]) => `${k}=${v}`).join(", ") : NONE;
  }

  async function api(path, options) {
    const opts = options || {};
    const headers = {};
    const key = sessionStorage.getItem(KEY);
    if (key) headers.Authorization = `Bearer ${key}`;
    let body;
    if (opts.body !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(opts.body);
    }
    const response = await fetch(API + path, { method: opts.method || "GET", headers, body });
    if (response.status === 401) {
      askForKey(Boolean(key));
      throw new AuthError("an API key is needed");
    }
    const parsed = await response.json().catch(() => null);
    if (!response.ok) {
      const message = parsed && parsed.error && parsed.error.message;
      throw new Error(message || `HTTP ${response.status}`);
    }
    return parsed;
  }

  // ---- the API key ----

  function askForKey(wrong) {
    keyForm.hidden = false;
    forgetKey.hidden = true;
    setStatus(wrong ? "That API key was not accepted; type the proxy's TOKENTRAIL_API_KEY." :
      "This proxy needs its API key (TOKENTRAIL_API_KEY) to show trajectories.", true);
    document.getElementById("api-key").focus();
  }

  keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("api-key");
    sessionStorage.setItem(KEY, input.value);
    input.value = "";
    keyForm.hidden = true;
    forgetKey.hidden = false;
    setStatus("");
    route();
  });

  forgetKey.addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    forgetKey.hidden = true;
    route();
  });

  // ---- routing ----

  function parseHash() {
    const hash = decodeURIComponent(location.hash.slice(1) || "/");
    if (hash.startsWith("/t/")) return { view: "trajectory", id: hash.slice(3) };
    const query = location.hash.includes("?") ? location.hash.slice(location.hash.indexOf("?") + 1) : "";
    return { view: "list", params: new URLSearchParams(query) };
  }

  async function route() {
    const where = parseHash();
    forgetKey.hidden = !sessionStorage.getItem(KEY);
    delete main.dataset.ready;
    try {
      if (where.view === "trajectory") await showTrajectory(where.id);
      else await showList(where.params);
    } catch (error) {
      if (!(error instanceof AuthError)) setStatus(`Could not load: ${error.message}`, true);
    }
  }

  function heading(text) {
    const h2 = el("h2", { tabindex: "-1", text });
    main.replaceChildren(h2);
    return h2;
  }

  // ---- the list ----

  const FILTERS = [
    { name: "tag", label: "Tag (key=value)", type: "text", placeholder: "env=prod" },
    { name: "group", label: "Group", type: "text", placeholder: "tag group=…" },
    { name: "finished", label: "Finished", choices: [["", "any"], ["true", "yes"], ["false", "no"]] },
    { name: "has_reward", label: "Has reward", choices: [["", "any"], ["true", "yes"], ["false", "no"]] },
    {
      name: "single_sequence", label: "One exact sequence",
      choices: [["", "any"], ["true", "yes"], ["false", "no (breaks or forks)"]],
    },
    { name: "since", label: "Created from", type: "datetime-local" },
    { name: "until", label: "Created before", type: "datetime-local" },
  ];

  function filterForm(params) {
    const fields = FILTERS.map((f) => {
      const id = `filter-${f.name}`;
      const value = params.get(f.name) || "";
      const control = f.choices
        ? el("select", { id, name: f.name },
          f.choices.map(([v, text]) => el("option", { value: v, selected: v === value, text })))
        : el("input", { id, name: f.name, type: f.type, value, placeholder: f.placeholder });
      return el("div", { class: "field" }, el("label", { for: id, text: f.label }), control);
    });
    const form = el("form", { class: "filters", role: "search", "aria-label": "Filter trajectories" },
      el("fieldset", { class: "filters" }, el("legend", { text: "Filters" }),
        el("div", { class: "filter-grid" }, fields,
          el("button", { type: "submit", text: "Apply filters" }),
          el("button", { type: "button", class: "link", text: "Clear", onclick: () => { location.hash = "#/"; } }))));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const next = new URLSearchParams();
      for (const f of FILTERS) {
        const value = form.elements[f.name].value.trim();
        if (value) next.set(f.name, value);
      }
      location.hash = `#/?${next}`;
    });
    return form;
  }

  function apiQuery(params) {
    const query = new URLSearchParams({ limit: params.get("limit") || String(PAGE), shape: "true" });
    for (const name of ["finished", "has_reward", "single_sequence", "cursor"]) {
      if (params.get(name)) query.set(name, params.get(name));
    }
    for (const name of ["since", "until"]) {
      if (params.get(name)) query.set(name, new Date(params.get(name)).toISOString());
    }
    for (const tag of (params.get("tag") || "").split(",")) {
      if (tag.trim()) query.append("tag", tag.trim());
    }
    if (params.get("group")) query.append("tag", `group=${params.get("group")}`);
    return query;
  }

  async function showList(params) {
    document.title = "Trajectories · TokenTrail";
    const h2 = heading("Trajectories");
    main.append(filterForm(params));
    setStatus("Loading trajectories…");
    const page = await api(`/trajectories?${apiQuery(params)}`);
    setStatus("");
    const columns = [
      ["Trajectory", ""], ["Created", ""], ["Calls", "num"], ["Tokens", "num"], ["Reward", "num"],
      ["Outcome problems", "num"], ["Drift breaks", "num"], ["Finished", ""], ["Tags", ""],
    ];
    const rows = page.data.map((t) => {
      const breaks = t.drift_breaks ?? t.prefix_breaks;
      return el("tr", {},
        el("th", { scope: "row" }, el("a", { href: `#/t/${encodeURIComponent(t.id)}`, text: t.id })),
        el("td", { text: when(t.created_at) }),
        el("td", { class: "num", text: t.call_count }),
        el("td", { class: "num", text: t.prompt_tokens + t.completion_tokens }),
        el("td", { class: "num", text: show(t.reward) }),
        el("td", { class: t.outcome_problems ? "num bad" : "num", text: show(t.outcome_problems) }),
        el("td", { class: breaks ? "num bad" : "num", text: show(breaks) }),
        el("td", { text: t.finished ? "yes" : "no" }),
        el("td", { text: tagsText(t.tags) }));
    });
    const table = el("table", { "aria-describedby": "list-caption" },
      el("caption", { id: "list-caption" },
        `${page.data.length} trajectories on this page, oldest first. Tokens: prompt + generated of all calls. ` +
        "Drift breaks: calls whose prompt did not extend the sequence before."),
      el("thead", {}, el("tr", {}, columns.map(([name, cls]) => el("th", { scope: "col", class: cls || null, text: name })))),
      el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: columns.length, class: "empty", text: "No trajectory matches." }))));
    const pager = el("nav", { class: "pager", "aria-label": "Pages" });
    if (params.get("cursor")) {
      const first = new URLSearchParams(params);
      first.delete("cursor");
      pager.append(el("a", { href: `#/?${first}`, text: "First page" }));
    }
    if (page.next_cursor) {
      const next = new URLSearchParams(params);
      next.set("cursor", page.next_cursor);
      pager.append(el("a", { href: `#/?${next}`, rel: "next", text: "Next page" }));
    }
    main.append(table, pager);
    main.dataset.ready = "list";
    h2.focus();
  }

  // ---- one trajectory ----

  function summary(t) {
    const items = [
      ["Created", when(t.created_at)], ["Finished", t.finished ? `yes, ${when(t.finished_at)}` : "no"],
      ["Reward", show(t.reward)], ["Tags", tagsText(t.tags)], ["Calls", t.call_count],
      ["Tokens", `${t.prompt_tokens} prompt + ${t.completion_tokens} generated, summed over the calls`],
    ];
    return el("dl", { class: "summary", id: "summary" },
      items.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { "data-field": k.toLowerCase(), text: v })]));
  }

  function editForms(id, refresh) {
    const reward = el("form", { "aria-label": "Set the reward" },
      el("label", { for: "reward-input", text: "Reward" }),
      el("input", { id: "reward-input", name: "reward", type: "number", step: "any", required: true }),
      el("button", { type: "submit", text: "Save reward" }));
    reward.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const t = await api(`/trajectories/${encodeURIComponent(id)}/reward`, {
          method: "POST", body: { reward: Number(reward.elements.reward.value) },
        });
        refresh(t);
        setStatus(`Reward saved: ${t.reward}`);
      } catch (error) {
        if (!(error instanceof AuthError)) setStatus(`Reward not saved: ${error.message}`, true);
      }
    });
    const tags = el("form", { "aria-label": "Add a tag" },
      el("label", { for: "tag-input", text: "Add tag (key=value)" }),
      el("input", { id: "tag-input", name: "tag", type: "text", required: true, pattern: "[^=]+=.*" }),
      el("button", { type: "submit", text: "Add tag" }));
    tags.addEventListener("submit", async (event) => {
      event.preventDefault();
      const [key, ...rest] = tags.elements.tag.value.split("=");
      try {
        const t = await api(`/trajectories/${encodeURIComponent(id)}/tags`, {
          method: "POST", body: { tags: { [key.trim()]: rest.join("=").trim() } },
        });
        refresh(t);
        tags.elements.tag.value = "";
        setStatus(`Tags saved: ${tagsText(t.tags)}`);
      } catch (error) {
        if (!(error instanceof AuthError)) setStatus(`Tag not saved: ${error.message}`, true);
      }
    });
    return el("div", { class: "edit" }, reward, tags);
  }

  function contentNode(content) {
    if (content === null || content === undefined) return el("pre", { class: "empty", text: "(no content)" });
    if (typeof content === "string") return el("pre", { text: content });
    if (Array.isArray(content)) {
      return el("pre", { text: content.map((part) => (part && part.type === "text" ? part.text : JSON.stringify(part))).join("\n") });
    }
    return el("pre", { text: JSON.stringify(content, null, 2) });
  }

  function toolCalls(calls) {
    return (calls || []).map((call) => {
      const fn = call.function || {};
      return el("div", { class: "tool-call" },
        el("strong", { text: `tool call ${fn.name || "?"}` }), call.id ? ` (${call.id})` : "",
        el("pre", { text: typeof fn.arguments === "string" ? fn.arguments : JSON.stringify(fn.arguments) }));
    });
  }

  function messageNode(message, cls) {
    const role = message.role || "message";
    return el("div", { class: `message ${cls || ""}` },
      el("div", { class: "role", text: message.tool_call_id ? `${role} → ${message.tool_call_id}` : role }),
      contentNode(message.content ?? message.text), toolCalls(message.tool_calls));
  }

  function certificateNode(cert) {  // what produced the call's tokens (README: Certificates)
    if (!cert) return el("p", { class: "empty certificate", text: "Certificate: (none recorded)" });
    const rows = [
      ["Certificate", cert.id], ["Template", cert.template_hash.slice(0, 16)], ["Model", show(cert.model)],
      ["Model root", show(cert.model_root)], ["Tokenizer", show(cert.tokenizer)], ["vLLM", show(cert.vllm_version)],
      ["Sampling", `${cert.sampling_digest.slice(0, 16)} ${JSON.stringify(cert.sampling || {})}`],
      ["Weight version", show(cert.weight_version)],
    ];
    return el("div", { class: "certificate" }, el("h5", { text: "Certificate" }),
      el("p", { class: "call-facts" }, rows.map(([k, v]) => el("span", {}, `${k}: `, el("strong", { text: v })))));
  }

  function callBody(call) {
    const request = call.request || {};
    const sent = Array.isArray(request.messages) ? request.messages.map((m) => messageNode(m))
      : [messageNode({ role: "prompt", content: request.prompt })];
    const replies = call.completions.map((c) => messageNode(
      { role: call.completions.length > 1 ? `reply ${c.choice_index}` : "reply", ...(c.message || {}) }, "reply"));
    const firstByte = call.upstream_first_byte_at
      ? `${Math.round(new Date(call.upstream_first_byte_at) - new Date(call.received_at))} ms` : NONE;
    const facts = [
      ["Outcome", call.outcome], ["Integrity", call.integrity], ["Status", show(call.status_code)],
      ["Latency", call.latency_ms == null ? NONE : `${Math.round(call.latency_ms)} ms`], ["First byte", firstByte],
      ["Weight version", show(call.weight_version)], ["Token-in", show(call.token_in_fallback ?? call.token_in)],
      ["Stream", call.stream ? "yes" : "no"],
    ];
    return el("div", { class: "call-body" },
      el("p", { class: "call-facts" }, facts.map(([k, v]) => el("span", {}, `${k}: `, el("strong", { text: v })))),
      call.error ? el("p", { class: "bad", text: `Error: ${call.error}` }) : null,
      certificateNode(call.certificate),
      el("h5", { text: "Messages as sent" }), sent,
      el("h5", { text: "Reply" }), replies.length ? replies : el("p", { class: "empty", text: "(no reply recorded)" }));
  }

  function callNode(call) {
    const failed = call.outcome !== "ok";
    const details = el("details", { class: failed ? "call failed" : "call", id: `call-${call.seq}` },
      el("summary", {}, el("h4", { text: `Call ${call.seq}` }),
        el("span", { class: "meta" },
          `${call.outcome} · ${call.latency_ms == null ? NONE : `${Math.round(call.latency_ms)} ms`} · ` +
          `${show(call.prompt_tokens)} prompt → ${show(call.completion_tokens)} generated tokens · ${show(call.model)}` +
          (call.certificate_id ? ` · certificate ${call.certificate_id.slice(0, 8)}` : ""))));
    let filled = false;
    details.addEventListener("toggle", () => {  // the messages of 50 calls are large: built when opened
      if (details.open && !filled) {
        filled = true;
        details.append(callBody(call));
      }
    });
    return details;
  }

  function breakCause(mismatch, promptLength) {
    if (mismatch.cause) return mismatch.cause;
    if (promptLength !== undefined && mismatch.position >= promptLength) {
      return `the prompt ended after ${mismatch.position} tokens, inside the previous prompt + reply ` +
        `(${mismatch.expected_length} tokens): history trimmed`;
    }
    return `token ${mismatch.position} differs from the previous prompt + reply ` +
      `(${mismatch.expected_length} tokens): history edited or rendered differently`;
  }

  function logprobColour(logprob) {
    const p = Math.exp(Math.max(-20, Math.min(0, logprob)));
    return `hsl(${Math.round(120 * p)} 75% 82%)`;
  }

  function pieceText(piece, id) {
    if (piece === null || piece === undefined) return `⟨${id}⟩`;
    return piece.replace(/\n/g, "↵\n");
  }

  function tokenView(sequence, index, pieces, breakHere, callsById) {
    const fragment = document.createDocumentFragment();
    const breakAt = breakHere ? breakHere.position : -1;
    const ids = sequence.input_ids;
    for (let i = 0; i < ids.length; i += 1) {
      if (i === breakAt) {
        fragment.append(el("span", {
          class: "break-mark", id: `break-${breakHere.seq}`, tabindex: "-1", role: "note",
          title: breakHere.text, text: `break · ${breakHere.short}`,
        }));
      }
      const generated = sequence.loss_mask[i] === 1;
      const logprob = sequence.logprobs[i];
      const piece = pieces[ids[i]];
      const span = document.createElement("span");
      span.className = generated ? (logprob == null ? "tok gen nolp" : "tok gen") : "tok ctx";
      if (piece === null || piece === undefined) span.className += " unknown";
      if (i === breakAt) span.className += " break-at";
      span.dataset.mask = generated ? "1" : "0";
      span.dataset.id = ids[i];
      if (generated && logprob != null) span.style.backgroundColor = logprobColour(logprob);
      span.title = `#${i} · id ${ids[i]} · ${generated ? "generated, loss mask 1" : "prompt, loss mask 0"}` +
        (logprob == null ? "" : ` · logprob ${logprob.toFixed(4)}`);
      span.textContent = pieceText(piece, ids[i]);
      fragment.append(span);
    }
    const seqs = sequence.call_ids.map((c) => callsById[c]).filter(Boolean).map((c) => c.seq);
    const last = seqs[seqs.length - 1];
    const range = !seqs.length ? "" : seqs.length === 1 ? `call ${last}` : `calls ${seqs[0]}–${last}`;
    const head = el("p", { class: "sequence-head", id: `seq-${index}-head` },
      `Sequence ${index + 1}: ${sequence.num_tokens} tokens, ${sequence.num_generated} generated (loss mask 1); ${range}`);
    const box = el("div", { class: "tokens", tabindex: "0", role: "region", "aria-labelledby": `seq-${index}-head` });
    box.append(fragment);
    return [head, box];
  }

  function legend() {
    return el("div", { class: "legend", "aria-label": "Legend" },
      el("span", {}, el("span", { class: "swatch tok ctx", text: "prompt" }), "loss mask 0"),
      el("span", {}, el("span", { class: "swatch tok gen nolp", text: "generated" }), "loss mask 1 (underlined)"),
      el("span", {}, "logprob ", el("span", { class: "scale", role: "img", "aria-label": "red: low, green: high" }), " low → high (value on hover)"),
      el("span", {}, el("span", { class: "break-mark", text: "break" }), "prefix break"));
  }

  async function showTrajectory(id) {
    document.title = `${id} · TokenTrail`;
    const h2 = heading(`Trajectory ${id}`);
    setStatus("Loading the trajectory…");
    const path = `/trajectories/${encodeURIComponent(id)}`;
    // the calls without their token arrays: the tokens come from /sequences, once
    const [detail, built] = await Promise.all([api(`${path}?token_ids=false`), api(`${path}/sequences?mode=merged`)]);
    const jump = (target, label) => el("button", {
      type: "button", class: "link", text: label,
      onclick: () => { const h = document.getElementById(target); h.scrollIntoView(); h.focus(); },
    });
    const back = el("nav", { class: "jump", "aria-label": "On this page" },
      el("a", { href: "#/", text: "← All trajectories" }), jump("calls-h", "Calls"), jump("tokens-h", "Training sequence"));
    let current = summary(detail.trajectory);
    const refresh = (t) => {
      const next = summary(t);
      current.replaceWith(next);
      current = next;
    };
    const callsById = Object.fromEntries(detail.calls.map((c) => [c.id, c]));
    const breaks = built.prefix_mismatches.map((m) => {
      const call = callsById[m.call_id];
      const text = breakCause(m, call && call.prompt_tokens != null ? call.prompt_tokens : undefined);
      return { ...m, text, short: `call ${m.seq}, token ${m.position}` };
    });
    const breakList = breaks.length
      ? el("ul", { class: "breaks", "aria-label": "Prefix breaks" },
        breaks.map((b) => el("li", {},
          el("button", {
            type: "button", class: "link", text: `Call ${b.seq}, token ${b.position}`,
            onclick: () => {
              const mark = document.getElementById(`break-${b.seq}`);
              if (mark) { mark.scrollIntoView({ block: "center" }); mark.focus(); }
            },
          }), `: ${b.text}`)))
      : el("p", { class: "empty", text: "No prefix break: every call extended the sequence before." });
    const tokensSection = el("section", { "aria-labelledby": "tokens-h" },
      el("h3", { id: "tokens-h", tabindex: "-1", text: "Training sequence (merged), token by token" }), legend(), breakList,
      el("p", { id: "tokens-pending", class: "empty", text: "Decoding tokens…" }));
    main.append(back, current, editForms(id, refresh),
      el("section", { "aria-labelledby": "calls-h" },
        el("h3", { id: "calls-h", tabindex: "-1", text: `Calls (${detail.calls.length}, in order)` }), detail.calls.map(callNode)),
      tokensSection);
    h2.focus();
    setStatus("Decoding tokens…");
    const distinct = [...new Set(built.sequences.flatMap((s) => s.input_ids))];
    const model = (detail.calls.find((c) => c.model) || {}).model || null;
    const decoded = distinct.length ? (await api("/detokenize", { method: "POST", body: { token_ids: distinct, model } })).pieces : {};
    const views = built.sequences.flatMap((s, i) => {
      const starts = i > 0 ? breaks.find((b) => b.call_id === s.call_ids[0]) : undefined;
      return tokenView(s, i, decoded, starts, callsById);
    });
    document.getElementById("tokens-pending").replaceWith(
      ...(views.length ? views : [el("p", { class: "empty", text: "No finished call: no training sequence." })]));
    setStatus("");
    main.dataset.ready = "trajectory";
  }

  window.addEventListener("hashchange", route);
  route();
})();
