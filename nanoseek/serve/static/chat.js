// The chat page: the conversation lives in `history` (this page only, nothing stored on the
// server); each turn posts the whole history to /v1/chat/completions with stream=true and
// parses the server-sent events as they arrive.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];          // [{role, content}] sent with every request
let model = null;
let controller = null;       // AbortController of the reply being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

function addBubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text || "";
  div.appendChild(content);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function reasoningBox(bubble) {
  let box = bubble.querySelector("details.reasoning");
  if (!box) {
    box = document.createElement("details");
    box.className = "reasoning";
    box.open = true;
    box.innerHTML = "<summary>reasoning</summary><div class=\"text\"></div>";
    bubble.insertBefore(box, bubble.firstChild);
  }
  return box.querySelector(".text");
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (r.status === 503) setTimeout(loadModel, 2000);  // still loading: ask again
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    model = body.data[0].id;
    $("model").textContent = model;
  } catch (e) {
    $("model").textContent = "(models: " + e.message + ")";
  }
}

// Yields each JSON object (or "[DONE]") from an SSE response body as it arrives.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  while (true) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        yield data === "[DONE]" ? data : JSON.parse(data);
      }
    }
  }
}

async function send() {
  const text = $("input").value.trim();
  if (!text || controller) return;
  if (!model) await loadModel();
  $("input").value = "";
  history.push({ role: "user", content: text });
  addBubble("user", text);
  const bubble = addBubble("assistant", "");
  const contentEl = bubble.querySelector(".content");
  let reply = "", ok = false;
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus("streaming");
  try {
    const body = {
      model: model, messages: history, stream: true,
      temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
    };
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : r.status + " " + r.statusText);
    }
    for await (const ev of sseEvents(r)) {
      if (ev === "[DONE]") break;
      if (ev.error) throw new Error(ev.error.message);
      const delta = (ev.choices && ev.choices[0] && ev.choices[0].delta) || {};
      if (delta.reasoning_content) reasoningBox(bubble).textContent += delta.reasoning_content;
      if (delta.content) {
        reply += delta.content;
        contentEl.textContent = reply;
        bubble.scrollIntoView({ block: "end" });
      }
    }
    ok = true;
    setStatus("ready");
  } catch (e) {
    if (e.name === "AbortError") setStatus("stopped");
    else { addBubble("error", e.message); setStatus("error"); }
  } finally {
    // keep what arrived, even when stopped, so the next turn sends what the user saw; a turn
    // that failed before any reply is dropped so that it can simply be asked again
    if (ok || reply) history.push({ role: "assistant", content: reply });
    else history.pop();
    bubble.dataset.done = "true";
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("send").addEventListener("click", send);
$("stop").addEventListener("click", () => controller && controller.abort());
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").replaceChildren();
  setStatus("ready");
});
$("api-key").addEventListener("change", loadModel);
loadModel();
