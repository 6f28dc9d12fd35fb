// The chat page: talks to this server's /v1/chat/completions (streamed), keeps conversations in localStorage,
// each with its own system prompt, sampling settings and thinking switch.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "mlx-qwen35.conversations";
const DEFAULTS = "mlx-qwen35.defaults"; // the settings a new conversation starts with: the last ones used
const BLANK_SETTINGS = { system: "", temperature: "", top_p: "", max_tokens: "", thinking: true };
const EXAMPLES = [
  "Explain the difference between a process and a thread, with an analogy.",
  "Write a Python function that merges overlapping intervals, with tests.",
  "What is the derivative of x^x? Show the steps.",
  "Plan a three-day trip to Kyoto in a table: morning, afternoon, evening.",
];
const state = {
  conversations: JSON.parse(localStorage.getItem(STORE) || "[]"),
  current: null,
  pending: [],
  controller: null,
  model: { name: "", context: null },
};

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// ---------------------------------------------------------------- rendering model output

// LaTeX between $…$, $$…$$, \(…\) or \[…\] becomes MathML through KaTeX. MathML needs no inline styles,
// which the Content-Security-Policy forbids; the TeX source annotation is dropped (the sanitiser would
// otherwise leave it as visible text).
const MATH = [
  { display: true, pattern: /^\$\$([\s\S]+?)\$\$/ },
  { display: true, pattern: /^\\\[([\s\S]+?)\\\]/ },
  { display: false, pattern: /^\\\(([\s\S]+?)\\\)/ },
  { display: false, pattern: /^\$(?!\s)((?:\\.|[^\\$\n])+?)(?<!\s)\$(?!\d)/ }, // not "$5 and $10"
];
function mathMarkup(tex, display) {
  return katex.renderToString(tex, { displayMode: display, output: "mathml", throwOnError: false })
    .replace(/<annotation[\s\S]*?<\/annotation>/g, "").replace(/<\/?semantics>/g, "");
}

// Model output is untrusted (a prompt can make the model write anything): raw HTML in it is shown as
// text, images become links (loading one could leak the conversation in its URL), and what marked
// renders passes an allow-list sanitiser that keeps only http(s) and mailto links, opened in a new tab.
// The server's Content-Security-Policy backs this up: no inline script, nothing loaded from elsewhere.
marked.use({
  renderer: {
    html: (html) => escapeHtml(typeof html === "string" ? html : html.text),
    image: (image, title, text) => { // marked 12 passes (href, title, text); later versions one token
      const href = typeof image === "string" ? image : image.href;
      const label = (typeof image === "string" ? text : image.text) || href;
      return `<a href="${escapeHtml(href)}">image: ${escapeHtml(label)}</a>`;
    },
  },
  extensions: [{
    name: "math",
    level: "inline",
    start(src) { const at = src.search(/\$|\\\(|\\\[/); return at < 0 ? undefined : at; },
    tokenizer(src) {
      for (const { display, pattern } of MATH) {
        const match = pattern.exec(src);
        if (match) return { type: "math", raw: match[0], text: match[1], display };
      }
      return undefined;
    },
    renderer: (token) => mathMarkup(token.text, token.display),
  }],
});
const MATHML_TAGS = ["math", "mrow", "mi", "mn", "mo", "ms", "mtext", "mspace", "msup", "msub", "msubsup", "mfrac",
  "msqrt", "mroot", "mover", "munder", "munderover", "mtable", "mtr", "mtd", "mstyle", "mpadded", "mphantom",
  "menclose", "merror"];
const MATHML_ATTRS = ["display", "mathvariant", "stretchy", "fence", "separator", "lspace", "rspace", "accent",
  "accentunder", "columnalign", "rowspacing", "columnspacing", "columnlines", "rowlines", "scriptlevel",
  "displaystyle", "width", "height", "depth", "voffset", "linethickness", "notation", "minsize", "maxsize",
  "movablelimits", "symmetric", "mathcolor", "mathbackground"];
const SANITIZE = {
  ALLOWED_TAGS: ["a", "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "em", "strong", "del", "code", "pre",
    "blockquote", "ul", "ol", "li", "table", "thead", "tbody", "tr", "th", "td", "input", "span", ...MATHML_TAGS],
  ALLOWED_ATTR: ["href", "title", "class", "align", "start", "type", "checked", "disabled", ...MATHML_ATTRS],
  ALLOWED_URI_REGEXP: /^(?:https?|mailto):/i,
};
// DOMPurify drops <math display="block"> whatever the allow-list says; keep exactly that attribute and value.
DOMPurify.addHook("uponSanitizeAttribute", (node, data) => {
  if (node.nodeName.toLowerCase() === "math" && data.attrName === "display" && /^(block|inline)$/.test(data.attrValue)) data.forceKeepAttr = true;
});
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
  if (node.tagName === "INPUT") { // task-list checkboxes only, never a live form control
    node.setAttribute("type", "checkbox");
    node.setAttribute("disabled", "");
  }
});

function renderMarkdown(element, text) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(text), SANITIZE);
  element.querySelectorAll("pre code").forEach((block) => {
    hljs.highlightElement(block);
    const copy = button("Copy", "copy-code", () => copyText(block.textContent, copy));
    block.parentElement.appendChild(copy);
  });
}

function button(label, className, onClick, title) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = label;
  if (className) element.className = className;
  if (title) element.title = title;
  element.onclick = (event) => { event.stopPropagation(); onClick(event); };
  return element;
}

// The Clipboard API where the page is a secure context (localhost is), else the old selection route.
async function copyText(text, control) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  const label = control.textContent;
  control.textContent = "Copied";
  setTimeout(() => { control.textContent = label; }, 1500);
}

// ---------------------------------------------------------------- conversations and their settings

function save() {
  localStorage.setItem(STORE, JSON.stringify(state.conversations));
}

function defaults() {
  return { ...BLANK_SETTINGS, ...JSON.parse(localStorage.getItem(DEFAULTS) || "{}") };
}

function conversation() {
  if (!state.current) {
    state.current = { id: Date.now().toString(36), title: "New chat", messages: [], settings: readSettings() };
    state.conversations.unshift(state.current);
  }
  return state.current;
}

function readSettings() {
  return {
    system: $("system-prompt").value,
    temperature: $("temperature").value,
    top_p: $("top-p").value,
    max_tokens: $("max-tokens").value,
    thinking: $("thinking").checked,
  };
}

function showSettings(settings) {
  $("system-prompt").value = settings.system;
  $("temperature").value = settings.temperature;
  $("top-p").value = settings.top_p;
  $("max-tokens").value = settings.max_tokens;
  $("thinking").checked = settings.thinking;
}

function settingsChanged() {
  const settings = readSettings();
  localStorage.setItem(DEFAULTS, JSON.stringify(settings));
  if (state.current) {
    state.current.settings = settings;
    save();
  }
}

function renameConversation(conv, item) {
  const input = document.createElement("input");
  input.value = conv.title;
  item.querySelector(".title").replaceWith(input);
  input.focus();
  input.select();
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    if (keep && input.value.trim()) conv.title = input.value.trim();
    save();
    renderSidebar();
  };
  input.onkeydown = (event) => {
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") finish(false);
  };
  input.onblur = () => finish(true);
  input.onclick = (event) => event.stopPropagation();
}

function exportConversation(conv) {
  const blob = new Blob([JSON.stringify(conv, null, 2)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${conv.title.replace(/[^\w\- ]+/g, "").trim() || "conversation"}.json`;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function deleteConversation(conv) {
  if (!confirm(`Delete "${conv.title}"? This cannot be undone.`)) return;
  state.conversations = state.conversations.filter((c) => c !== conv);
  if (state.current === conv) state.current = null;
  save();
  renderAll();
}

function renderSidebar() {
  const list = $("conversations");
  list.innerHTML = "";
  for (const conv of state.conversations) {
    const item = document.createElement("li");
    item.className = conv === state.current ? "active" : "";
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = conv.title;
    const actions = document.createElement("span");
    actions.className = "actions";
    actions.append(
      button("✎", "rename", () => renameConversation(conv, item), "Rename"),
      button("⤓", "export", () => exportConversation(conv), "Export as JSON"),
      button("✕", "delete", () => deleteConversation(conv), "Delete"),
    );
    item.append(title, actions);
    item.onclick = () => {
      if (state.controller) return; // the streaming reply belongs to the open conversation
      state.current = conv;
      closeSidebarOnPhone();
      renderAll();
    };
    list.appendChild(item);
  }
}

// ---------------------------------------------------------------- messages

function messageElement(role) {
  const element = document.createElement("div");
  element.className = `message ${role}`;
  $("messages").appendChild(element);
  return element;
}

function messageText(message) {
  if (typeof message.content === "string") return message.content;
  return (message.content || []).filter((p) => p.type === "text").map((p) => p.text).join("\n");
}

function renderUser(message, index) {
  const element = messageElement("user");
  const parts = typeof message.content === "string" ? [{ type: "text", text: message.content }] : message.content;
  for (const part of parts) {
    if (part.type === "image_url") {
      const img = document.createElement("img");
      img.src = part.image_url.url;
      element.appendChild(img);
    } else {
      const text = document.createElement("div");
      text.className = "text";
      text.textContent = part.text;
      element.appendChild(text);
    }
  }
  const bar = document.createElement("div");
  bar.className = "bar";
  const copy = button("Copy", "copy", () => copyText(messageText(message), copy));
  bar.append(copy, button("Edit", "edit", () => editMessage(element, index)));
  element.appendChild(bar);
}

// Edit a sent message in place; sending it drops everything after it and asks again.
function editMessage(element, index) {
  if (state.controller) return;
  const conv = state.current;
  const message = conv.messages[index];
  element.innerHTML = "";
  element.classList.add("editor");
  const area = document.createElement("textarea");
  area.value = messageText(message);
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.append(
    button("Cancel", "cancel", () => renderAll()),
    button("Send", "resend", () => {
      const text = area.value.trim();
      if (!text) return;
      const images = typeof message.content === "string" ? [] : message.content.filter((p) => p.type === "image_url");
      conv.messages = conv.messages.slice(0, index);
      conv.messages.push({ role: "user", content: images.length ? [...images, { type: "text", text }] : text });
      save();
      ask(conv);
    }),
  );
  element.append(area, bar);
  area.focus();
}

function thinkingSummary(thinking, live) {
  const seconds = `${thinking.seconds.toFixed(1)} s`;
  const tokens = `${thinking.tokens} token${thinking.tokens === 1 ? "" : "s"}`;
  return live ? `Thinking · ${seconds} · ${tokens}` : `Thought for ${seconds} · ${tokens}`;
}

// An assistant bubble: collapsible thinking (live while it streams), markdown answer, tool calls, a notice
// when the reply did not end by itself, stats, and copy / regenerate.
function assistantView(isLast) {
  const element = messageElement("assistant");
  const thinking = document.createElement("details");
  thinking.className = "thinking";
  thinking.hidden = true;
  thinking.innerHTML = "<summary></summary><div></div>";
  const answer = document.createElement("div");
  answer.className = "answer";
  const tools = document.createElement("div");
  const notice = document.createElement("div");
  notice.className = "notice";
  notice.hidden = true;
  const meta = document.createElement("div");
  meta.className = "meta";
  const bar = document.createElement("div");
  bar.className = "bar";
  element.append(thinking, answer, tools, notice, meta, bar);
  let shownBar = false;
  return {
    element,
    show(message, live = false) {
      const thinkingLive = live && !message.content && !(message.tool_calls || []).length;
      thinking.hidden = !message.reasoning_content;
      thinking.classList.toggle("live", thinkingLive);
      thinking.firstChild.textContent = message.thinking ? thinkingSummary(message.thinking, thinkingLive) : "Thinking";
      thinking.lastChild.textContent = message.reasoning_content || "";
      renderMarkdown(answer, message.content || "");
      tools.innerHTML = "";
      for (const call of message.tool_calls || []) {
        const line = document.createElement("div");
        line.className = "tool-call";
        line.textContent = `${call.function.name}(${call.function.arguments})`;
        tools.appendChild(line);
      }
      const cut = message.finish === "length"
        ? "Cut off: the reply reached the token limit. Raise Max tokens in ⚙ settings, or regenerate."
        : message.finish === "stopped" ? "Stopped before the reply was finished." : "";
      notice.hidden = !cut;
      notice.textContent = cut;
      meta.textContent = message.meta || "";
      if (!live && !shownBar) {
        shownBar = true;
        const copy = button("Copy", "copy", () => copyText(message.content || "", copy));
        bar.appendChild(copy);
        if (isLast) bar.appendChild(button("Regenerate", "regenerate", regenerate));
      }
      $("messages").scrollTop = $("messages").scrollHeight;
    },
  };
}

function renderAll() {
  $("messages").innerHTML = "";
  const messages = state.current ? state.current.messages : [];
  messages.forEach((message, index) => {
    if (message.role === "user") renderUser(message, index);
    else assistantView(index === messages.length - 1).show(message);
  });
  showSettings(state.current && state.current.settings ? { ...BLANK_SETTINGS, ...state.current.settings } : defaults());
  renderEmpty(messages.length === 0);
  renderSidebar();
}

function renderEmpty(empty) {
  $("empty").hidden = !empty;
  $("messages").hidden = empty;
  $("empty-model").textContent = state.model.name || "mlx-qwen35";
  $("empty-context").textContent = state.model.context
    ? `${state.model.context.toLocaleString("en-US")}-token context · runs on this Mac`
    : "Ask anything; images too.";
}

function renderExamples() {
  const box = $("examples");
  for (const example of EXAMPLES) {
    box.appendChild(button(example, "example", () => {
      if (state.controller) return;
      send(example);
    }));
  }
}

// ---------------------------------------------------------------- talking to the server

// A server started with --api-key asks the browser to sign in (HTTP Basic, the key as the password) when
// the page loads; the browser then sends the key with every request of this page. The key is never
// in reach of the page's script (earlier versions kept it in localStorage: forget it).
localStorage.removeItem("mlx-qwen35.api-key");
// Requests name the origin: a page opened as http://user:key@host/ has the credentials in its base URL,
// and fetch refuses relative URLs that would carry them.
const endpoint = (path) => new URL(path, location.origin);

// Reads server-sent events from a fetch response, calling onChunk with each JSON payload.
async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") return;
      onChunk(JSON.parse(data));
    }
  }
}

function formatStats(usage, timings) {
  const parts = [];
  if (timings && timings.generation_tps) parts.push(`${timings.generation_tps.toFixed(1)} tok/s`);
  if (usage) parts.push(`context ${usage.total_tokens} tokens`);
  if (usage && usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) parts.push(`${usage.prompt_tokens_details.cached_tokens} cached`);
  return parts.join(" · ");
}

function requestBody(conv) {
  const settings = { ...BLANK_SETTINGS, ...conv.settings };
  const history = conv.messages.map(({ role, content, tool_calls }) => ({ role, content, ...(tool_calls && tool_calls.length ? { tool_calls } : {}) }));
  const body = {
    messages: settings.system.trim() ? [{ role: "system", content: settings.system }, ...history] : history,
    stream: true,
    stream_options: { include_usage: true },
    chat_template_kwargs: { enable_thinking: settings.thinking },
  };
  if (settings.temperature !== "") body.temperature = Number(settings.temperature);
  if (settings.top_p !== "") body.top_p = Number(settings.top_p);
  if (settings.max_tokens !== "") body.max_tokens = Number(settings.max_tokens);
  return body;
}

async function send(text) {
  const conv = conversation();
  const content = state.pending.length
    ? [...state.pending.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text }]
    : text;
  conv.messages.push({ role: "user", content });
  if (conv.title === "New chat") conv.title = text.slice(0, 40) || "Image";
  state.pending = [];
  renderAttachments();
  await ask(conv);
}

async function regenerate() {
  const conv = state.current;
  if (state.controller || !conv) return;
  while (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") conv.messages.pop();
  await ask(conv);
}

// Stream the model's reply to the conversation as it stands.
async function ask(conv) {
  save(); // the question is kept even if the page goes away while the reply streams
  renderAll();
  const reply = { role: "assistant", content: "", reasoning_content: "", tool_calls: [] };
  const view = assistantView(true);
  state.controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let thinkingEnded = null;
  const tick = setInterval(() => { // the live thinking indicator counts while no answer has come
    if (reply.thinking && thinkingEnded === null) {
      reply.thinking.seconds = (performance.now() - started) / 1000;
      view.show(reply, true);
    }
  }, 250);
  try {
    const response = await fetch(endpoint("/v1/chat/completions"), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      signal: state.controller.signal,
      body: JSON.stringify(requestBody(conv)),
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error((error.error && error.error.message) || `HTTP ${response.status}`);
    }
    let scheduled = false;
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta) {
        const thought = choice.delta.reasoning_content ?? choice.delta.reasoning; // --reasoning-field picks either
        if (thought) {
          reply.reasoning_content += thought;
          reply.thinking = reply.thinking || { seconds: 0, tokens: 0 };
          reply.thinking.tokens += 1; // the server sends a delta per token
          reply.thinking.seconds = (performance.now() - started) / 1000;
        }
        if ((choice.delta.content || choice.delta.tool_calls) && reply.thinking && thinkingEnded === null) thinkingEnded = performance.now();
        reply.content += choice.delta.content || "";
        for (const call of choice.delta.tool_calls || []) reply.tool_calls.push({ id: call.id, type: "function", function: call.function });
      }
      if (choice && choice.finish_reason) reply.finish = choice.finish_reason;
      if (chunk.timings) reply.timings = chunk.timings;
      if (chunk.usage) reply.meta = formatStats(chunk.usage, reply.timings) || reply.meta;
      if (chunk.timings) $("stats").textContent = reply.meta;
      if (!scheduled) { // re-render markdown at most once a frame
        scheduled = true;
        requestAnimationFrame(() => { scheduled = false; if (state.controller) view.show(reply, true); });
      }
    });
  } catch (error) {
    if (error.name === "AbortError") {
      reply.finish = "stopped";
      reply.meta = "stopped";
    } else messageElement("error").textContent = error.message;
  } finally {
    clearInterval(tick);
    state.controller = null;
    setBusy(false);
    if (reply.content || reply.reasoning_content || reply.tool_calls.length) conv.messages.push(reply);
    view.show(reply);
    save();
    renderSidebar();
  }
}

function setBusy(busy) {
  $("stop").hidden = !busy;
  $("send").disabled = busy;
  $("send").title = busy ? "A reply is streaming: stop it or wait" : "";
}

function renderAttachments() {
  const box = $("attachments");
  box.innerHTML = "";
  state.pending.forEach((url, i) => {
    const img = document.createElement("img");
    img.src = url;
    img.title = "Click to remove";
    img.onclick = () => { state.pending.splice(i, 1); renderAttachments(); };
    box.appendChild(img);
  });
}

function attach(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    const reader = new FileReader();
    reader.onload = () => { state.pending.push(reader.result); renderAttachments(); };
    reader.readAsDataURL(file);
  }
}

// ---------------------------------------------------------------- layout and wiring

const phone = window.matchMedia("(max-width: 700px)");
function closeSidebarOnPhone() {
  if (phone.matches) document.body.classList.remove("sidebar-open");
}
$("toggle-sidebar").onclick = () => document.body.classList.toggle(phone.matches ? "sidebar-open" : "sidebar-collapsed");
$("scrim").onclick = closeSidebarOnPhone;
$("toggle-settings").onclick = () => { $("settings").hidden = !$("settings").hidden; };
for (const id of ["system-prompt", "temperature", "top-p", "max-tokens", "thinking"]) $(id).addEventListener("change", settingsChanged);

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  if (state.controller) return; // a reply is streaming: one request at a time, so Stop reaches it
  const text = $("prompt").value.trim();
  if (!text && !state.pending.length) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").onclick = () => state.controller && state.controller.abort();
$("new-chat").onclick = () => {
  if (state.controller) return;
  state.current = null;
  closeSidebarOnPhone();
  renderAll();
};
$("file").onchange = (event) => { attach(event.target.files); event.target.value = ""; };
$("prompt").addEventListener("paste", (event) => attach(event.clipboardData.files));
$("composer").addEventListener("dragover", (event) => { event.preventDefault(); $("composer").classList.add("dragging"); });
$("composer").addEventListener("dragleave", () => $("composer").classList.remove("dragging"));
$("composer").addEventListener("drop", (event) => { event.preventDefault(); $("composer").classList.remove("dragging"); attach(event.dataTransfer.files); });

fetch(endpoint("/health")).then((r) => r.json()).then((health) => {
  state.model = { name: health.model || "", context: health.context_length || null };
  $("model-name").textContent = state.model.name;
  $("context-size").textContent = state.model.context ? `${Math.round(state.model.context / 1024)}k context` : "";
  document.title = `${state.model.name} · mlx-qwen35`;
  renderEmpty(!state.current || state.current.messages.length === 0);
}).catch(() => {});
renderExamples();
state.current = state.conversations[0] || null;
renderAll();
