// The chat page: keeps the conversation in `messages`, sends it all to /v1/chat/completions with stream: true,
// and appends each streamed delta to the answer as it arrives. Plain JavaScript, no build step.
// With retrieval on (a server started with --rag INDEX), /v1/rag/context first turns the question into messages
// holding the retrieved sources, numbered; the sources are listed under the answer.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;
let messages = [];  // [{role, content}], the whole conversation sent with every turn
let controller = null;  // aborts the running answer (Stop)

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;  // textContent, never innerHTML: the model's text is not markup
  item.append(label, body);
  $("conversation").append(item);
  item.scrollIntoView({ block: "end" });
  return body;
}

async function loadIndex() {
  const response = await fetch("/v1/rag", { headers: headers() }).catch(() => null);
  if (!response || !response.ok) return;  // no index on this server: no switch
  const info = await response.json();
  $("retrieval-index").textContent = `(${info.index}: ${info.chunks} chunks)`;
  $("retrieval-line").hidden = false;
}

function showSources(item, sources) {
  const list = document.createElement("ol");
  list.className = "sources";
  list.setAttribute("aria-label", "Sources");
  for (const s of sources) {
    const entry = document.createElement("li");
    entry.value = s.n;
    entry.textContent = `${s.source} (characters ${s.start}-${s.end}): ${s.text.slice(0, 160)}`;
    list.append(entry);
  }
  item.append(list);
}

async function retrieve(text, earlier) {
  const response = await fetch("/v1/rag/context", {
    method: "POST", headers: headers(), body: JSON.stringify({ question: text, messages: earlier, k: Number($("rag-k").value) }),
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error ? data.error.message : response.statusText);
  return data;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error ? data.error.message : response.statusText);
    model = data.data[0].id;
    $("model-name").textContent = model;
  } catch (e) {
    $("model-name").textContent = "unavailable";
    showError("Could not list the model: " + e.message);
  }
}

// Read Server-Sent Events ("data: {...}\n\n") from a fetch response; call onEvent for each JSON payload.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") return;
        onEvent(JSON.parse(payload));
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("status").textContent = busy ? "The assistant is answering…" : "";
}

async function send(text) {
  if (!model) await loadModel();
  if (!model) return;
  showError("");
  const conversation = messages;  // "New chat" during this answer starts a new array; this one keeps the turn
  const earlier = conversation.slice();
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  const system = $("system").value.trim();
  const body = {
    model,
    messages: system ? [{ role: "system", content: system }, ...conversation] : conversation,
    stream: true,
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
  controller = new AbortController();
  setBusy(true);
  try {
    if ($("retrieval").checked) {
      const found = await retrieve(text, earlier);
      body.messages = found.messages;  // the sources, numbered, before the question (the conversation keeps it plain)
      showSources(answer.parentElement, found.sources);
    }
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      throw new Error(data.error ? data.error.message : response.statusText);
    }
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) answer.textContent += choice.delta.content;
      }
    });
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    setBusy(false);
    controller = null;
    // Keep what was answered (even if stopped), so that the next turn sees the whole conversation.
    conversation.push({ role: "assistant", content: answer.textContent });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  loadModel();
  loadIndex();
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("message").value.trim();
    if (!text || controller) return;
    $("message").value = "";
    send(text);
  });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (controller) controller.abort();
    messages = [];
    $("conversation").replaceChildren();
    showError("");
    $("message").focus();
  });
});
