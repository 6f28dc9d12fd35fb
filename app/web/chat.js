// The chat page: talks to this server's /v1/chat/completions (streamed), keeps conversations in localStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "mlx-qwen35.conversations";
const state = { conversations: JSON.parse(localStorage.getItem(STORE) || "[]"), current: null, pending: [], controller: null };

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
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
});
const SANITIZE = {
  ALLOWED_TAGS: ["a", "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "em", "strong", "del", "code", "pre",
    "blockquote", "ul", "ol", "li", "table", "thead", "tbody", "tr", "th", "td", "input"],
  ALLOWED_ATTR: ["href", "title", "class", "align", "start", "type", "checked", "disabled"],
  ALLOWED_URI_REGEXP: /^(?:https?|mailto):/i,
};
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
  element.querySelectorAll("pre code").forEach((block) => hljs.highlightElement(block));
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(state.conversations));
}

function conversation() {
  if (!state.current) {
    state.current = { id: Date.now().toString(36), title: "New chat", messages: [] };
    state.conversations.unshift(state.current);
  }
  return state.current;
}

function renderSidebar() {
  const list = $("conversations");
  list.innerHTML = "";
  for (const conv of state.conversations) {
    const item = document.createElement("li");
    item.textContent = conv.title;
    item.className = conv === state.current ? "active" : "";
    item.onclick = () => { state.current = conv; renderAll(); };
    list.appendChild(item);
  }
}

function messageElement(role) {
  const element = document.createElement("div");
  element.className = `message ${role}`;
  $("messages").appendChild(element);
  return element;
}

function renderUser(message) {
  const element = messageElement("user");
  const parts = typeof message.content === "string" ? [{ type: "text", text: message.content }] : message.content;
  for (const part of parts) {
    if (part.type === "image_url") {
      const img = document.createElement("img");
      img.src = part.image_url.url;
      element.appendChild(img);
    } else {
      const text = document.createElement("div");
      text.textContent = part.text;
      element.appendChild(text);
    }
  }
}

// An assistant bubble: collapsible thinking, markdown answer, tool calls, stats line.
function assistantView() {
  const element = messageElement("assistant");
  const thinking = document.createElement("details");
  thinking.className = "thinking";
  thinking.hidden = true;
  thinking.innerHTML = "<summary>Thinking</summary><div></div>";
  const answer = document.createElement("div");
  answer.className = "answer";
  const tools = document.createElement("div");
  const meta = document.createElement("div");
  meta.className = "meta";
  element.append(thinking, answer, tools, meta);
  return {
    element,
    show(message) {
      thinking.hidden = !message.reasoning_content;
      thinking.lastChild.textContent = message.reasoning_content || "";
      renderMarkdown(answer, message.content || "");
      tools.innerHTML = "";
      for (const call of message.tool_calls || []) {
        const line = document.createElement("div");
        line.className = "tool-call";
        line.textContent = `${call.function.name}(${call.function.arguments})`;
        tools.appendChild(line);
      }
      meta.textContent = message.meta || "";
      $("messages").scrollTop = $("messages").scrollHeight;
    },
  };
}

function renderAll() {
  $("messages").innerHTML = "";
  for (const message of state.current ? state.current.messages : []) {
    if (message.role === "user") renderUser(message);
    else assistantView().show(message);
  }
  renderSidebar();
}

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

async function send(text) {
  const conv = conversation();
  const content = state.pending.length
    ? [...state.pending.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text }]
    : text;
  conv.messages.push({ role: "user", content });
  if (conv.title === "New chat") conv.title = text.slice(0, 40) || "Image";
  state.pending = [];
  renderAttachments();
  renderAll();
  const reply = { role: "assistant", content: "", reasoning_content: "", tool_calls: [] };
  const view = assistantView();
  const history = conv.messages.map(({ role, content, tool_calls }) => ({ role, content, ...(tool_calls && tool_calls.length ? { tool_calls } : {}) }));
  state.controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch(endpoint("/v1/chat/completions"), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      signal: state.controller.signal,
      body: JSON.stringify({
        messages: history, stream: true, stream_options: { include_usage: true },
        chat_template_kwargs: { enable_thinking: $("thinking").checked },
      }),
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
        reply.content += choice.delta.content || "";
        reply.reasoning_content += choice.delta.reasoning_content || "";
        for (const call of choice.delta.tool_calls || []) reply.tool_calls.push({ id: call.id, type: "function", function: call.function });
      }
      if (chunk.timings) reply.timings = chunk.timings;
      if (chunk.usage) reply.meta = formatStats(chunk.usage, reply.timings) || reply.meta;
      if (chunk.timings) $("stats").textContent = reply.meta;
      if (!scheduled) { // re-render markdown at most once a frame
        scheduled = true;
        requestAnimationFrame(() => { scheduled = false; view.show(reply); });
      }
    });
  } catch (error) {
    if (error.name === "AbortError") reply.meta = "stopped";
    else messageElement("error").textContent = error.message;
  } finally {
    state.controller = null;
    setBusy(false);
    view.show(reply);
    if (reply.content || reply.reasoning_content || reply.tool_calls.length) conv.messages.push(reply);
    save();
    renderSidebar();
  }
}

function setBusy(busy) {
  $("stop").hidden = !busy;
  $("send").disabled = busy;
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
$("new-chat").onclick = () => { state.current = null; renderAll(); };
$("file").onchange = (event) => { attach(event.target.files); event.target.value = ""; };
$("prompt").addEventListener("paste", (event) => attach(event.clipboardData.files));
$("composer").addEventListener("dragover", (event) => { event.preventDefault(); $("composer").classList.add("dragging"); });
$("composer").addEventListener("dragleave", () => $("composer").classList.remove("dragging"));
$("composer").addEventListener("drop", (event) => { event.preventDefault(); $("composer").classList.remove("dragging"); attach(event.dataTransfer.files); });

fetch(endpoint("/health")).then((r) => r.json()).then((h) => { $("model-name").textContent = h.model; }).catch(() => {});
state.current = state.conversations[0] || null;
renderAll();
