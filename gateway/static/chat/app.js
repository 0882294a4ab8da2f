// The chat page's state and wiring: models, conversations, sending, streaming, Stop, settings, the API key.
import { Api, AuthError } from "./api.js";
import * as store from "./store.js";
import { renderMessages, renderSidebar, updateAssistant } from "./view.js";

const $ = (id) => document.getElementById(id);
const SAVE_EVERY_MS = 1000; // while a reply streams: often enough that a reload loses little

const state = {
  conversations: store.loadConversations(),
  currentId: null,
  settings: store.loadSettings(),
  streaming: null, // { controller, conversation, message } while a reply streams
  frame: 0, // a pending requestAnimationFrame: deltas are drawn at most once per frame
  savedAt: 0,
};
const api = new Api(store.loadKey);

// -- small helpers ----------------------------------------------------------------------------------

function banner(text) {
  $("banner").textContent = text || "";
  $("banner").hidden = !text;
}

function current() {
  return state.conversations.find((c) => c.id === state.currentId) || null;
}

function persist() {
  state.savedAt = performance.now();
  try {
    store.saveConversations(state.conversations);
  } catch {
    banner("This browser's storage is full: export your conversations, then delete old ones.");
  }
}

function titleOf(text) {
  const line = text.trim().split("\n")[0];
  return line.length > 48 ? `${line.slice(0, 47)}…` : line || "New chat";
}

function nearBottom(element) {
  return element.scrollHeight - element.scrollTop - element.clientHeight < 80;
}

// -- drawing ----------------------------------------------------------------------------------------

const handlers = {
  open(id) {
    state.currentId = id;
    document.body.classList.remove("sidebar-open");
    redraw();
  },
  remove(id) {
    if (state.streaming && state.streaming.conversation.id === id) state.streaming.controller.abort();
    state.conversations = state.conversations.filter((c) => c.id !== id);
    if (state.currentId === id) state.currentId = null;
    persist();
    redraw();
  },
  regenerate(index) {
    const conversation = current();
    if (state.streaming || !conversation) return;
    conversation.messages.splice(index);
    generate(conversation);
  },
  edit(index, text) {
    const conversation = current();
    if (state.streaming || !conversation) return;
    conversation.messages.splice(index, conversation.messages.length - index, { role: "user", content: text });
    if (index === 0) conversation.title = titleOf(text);
    generate(conversation);
  },
  redraw: () => redraw(),
};

function redraw() {
  const box = $("messages");
  const stick = nearBottom(box);
  renderSidebar(state.conversations, state.currentId, handlers);
  renderMessages(current(), handlers, Boolean(state.streaming));
  if (stick) box.scrollTop = box.scrollHeight;
  $("send").hidden = Boolean(state.streaming);
  $("stop").hidden = !state.streaming;
}

// One draw per frame however many deltas arrived: only the streaming message changes.
function drawStreaming() {
  state.frame = 0;
  const streaming = state.streaming;
  if (!streaming || streaming.conversation.id !== state.currentId) return;
  const box = $("messages");
  const stick = nearBottom(box);
  const article = box.querySelector(`article[data-index="${streaming.conversation.messages.length - 1}"]`);
  if (article) updateAssistant(article, streaming.message);
  if (stick) box.scrollTop = box.scrollHeight;
  if (performance.now() - state.savedAt > SAVE_EVERY_MS) persist();
}

function scheduleDraw() {
  if (!state.frame) state.frame = requestAnimationFrame(drawStreaming);
}

// -- the API key ------------------------------------------------------------------------------------

let keyWaiters = [];

function askForKey(reason) {
  $("key-reason").textContent = reason;
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("key").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  store.saveKey($("key").value.trim());
  $("key").value = "";
  $("key-dialog").close();
  const waiters = keyWaiters;
  keyWaiters = [];
  for (const resolve of waiters) resolve();
});

// -- models -----------------------------------------------------------------------------------------

async function loadModels() {
  for (;;) {
    try {
      const models = await api.models();
      showModels(models);
      banner("");
      return;
    } catch (error) {
      if (!(error instanceof AuthError)) {
        banner(`Cannot list the models: ${error.message}. Click here to retry.`);
        return;
      }
      const reason = store.loadKey() ? "The server refused that key." : "This server wants an API key.";
      await askForKey(reason);
    }
  }
}

function showModels(models) {
  const select = $("model");
  select.replaceChildren(
    ...models.map((id) => {
      const option = document.createElement("option");
      option.value = option.textContent = id;
      return option;
    }),
  );
  if (!models.includes(state.settings.model)) state.settings.model = models[0] || "";
  select.value = state.settings.model;
  store.saveSettings(state.settings);
  if (!models.length) banner("The server serves no model yet.");
}

$("model").addEventListener("change", () => {
  state.settings.model = $("model").value;
  store.saveSettings(state.settings);
});

$("banner").addEventListener("click", () => loadModels());

// -- sending and streaming --------------------------------------------------------------------------

function requestBody(conversation) {
  const history = conversation.messages
    .slice(0, -1) // the reply being written
    .filter((m) => m.content || m.role === "user") // a failed reply with no text is not part of the talk
    .map((m) => ({ role: m.role, content: m.content }));
  const { model, system, temperature, top_p, max_tokens } = state.settings;
  const body = { model, messages: system.trim() ? [{ role: "system", content: system }, ...history] : history };
  Object.assign(body, { stream: true, stream_options: { include_usage: true } });
  for (const [name, value] of Object.entries({ temperature, top_p, max_tokens })) {
    if (value !== null && value !== "" && Number.isFinite(Number(value))) body[name] = Number(value);
  }
  return body;
}

function take(message, event, clock) {
  const choice = event.choices && event.choices[0];
  if (choice) {
    const delta = choice.delta || {};
    if (delta.reasoning_content) message.reasoning = (message.reasoning || "") + delta.reasoning_content;
    if (delta.content) message.content += delta.content;
    if (delta.content || delta.reasoning_content) {
      clock.last = performance.now();
      clock.first = clock.first || clock.last;
    }
    if (choice.finish_reason) message.finish = choice.finish_reason;
  }
  if (event.usage) message.tokens = event.usage.completion_tokens;
}

async function generate(conversation) {
  const model = state.settings.model;
  const message = { role: "assistant", content: "", state: "streaming", model };
  conversation.messages.push(message);
  Object.assign(conversation, { model, system: state.settings.system, updated: Date.now() });
  const controller = new AbortController();
  state.streaming = { controller, conversation, message };
  persist();
  redraw();
  const clock = { first: 0, last: 0 };
  try {
    for await (const event of api.chat(requestBody(conversation), controller.signal)) {
      take(message, event, clock);
      scheduleDraw();
    }
    message.state = "done";
  } catch (error) {
    message.state = controller.signal.aborted ? "stopped" : "error";
    if (!controller.signal.aborted) message.error = error.message;
    if (error instanceof AuthError) askForKey("The server wants an API key; then press Regenerate.");
  } finally {
    // Decode speed as the reader saw it: the tokens after the first, over the time from the first to the last.
    if (message.tokens > 1 && clock.last > clock.first) message.seconds = (clock.last - clock.first) / 1000;
    state.streaming = null;
    persist();
    redraw();
  }
}

function stop() {
  if (state.streaming) state.streaming.controller.abort();
}

function submit() {
  const text = $("prompt").value;
  if (state.streaming || !text.trim()) return;
  if (!state.settings.model) {
    banner("No model to talk to yet. Click here to load the list again.");
    return;
  }
  let conversation = current();
  if (!conversation) {
    conversation = store.newConversation();
    state.conversations.push(conversation);
    state.currentId = conversation.id;
  }
  if (!conversation.messages.length) conversation.title = titleOf(text);
  conversation.messages.push({ role: "user", content: text });
  $("prompt").value = "";
  generate(conversation);
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  }
});
$("stop").addEventListener("click", stop);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && state.streaming && !document.querySelector("dialog[open]")) stop();
});

// -- conversations: new, export, import -------------------------------------------------------------

$("new-chat").addEventListener("click", () => {
  state.currentId = null;
  document.body.classList.remove("sidebar-open");
  redraw();
  $("prompt").focus();
});

$("export").addEventListener("click", () => {
  const blob = new Blob([store.exportText(state.conversations)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `tandem-chats-${new Date().toISOString().slice(0, 10)}.json`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 0);
});

$("import").addEventListener("click", () => $("import-file").click());
$("import-file").addEventListener("change", async () => {
  const file = $("import-file").files[0];
  $("import-file").value = "";
  if (!file) return;
  try {
    const imported = store.parseImport(await file.text());
    const ids = new Set(imported.map((c) => c.id));
    const busy = state.streaming && state.streaming.conversation.id;
    // Same id: the imported copy wins, except over the conversation being answered right now.
    state.conversations = [...state.conversations.filter((c) => !ids.has(c.id) || c.id === busy), ...imported.filter((c) => c.id !== busy)];
    persist();
    redraw();
    banner(`Imported ${imported.length} conversation${imported.length === 1 ? "" : "s"}.`);
  } catch (error) {
    banner(`Not a conversation export: ${error.message}`);
  }
});

// -- settings and theme -----------------------------------------------------------------------------

const FIELDS = { system: "system", temperature: "temperature", top_p: "top-p", max_tokens: "max-tokens" };

$("open-settings").addEventListener("click", () => {
  for (const [name, id] of Object.entries(FIELDS)) $(id).value = state.settings[name] ?? "";
  $("settings").showModal();
});

// Closing by Done or by Escape keeps what was typed.
$("settings").addEventListener("close", () => {
  for (const [name, id] of Object.entries(FIELDS)) {
    const value = $(id).value;
    state.settings[name] = name === "system" ? value : value === "" ? null : Number(value);
  }
  store.saveSettings(state.settings);
});
$("settings-form").addEventListener("submit", (event) => {
  event.preventDefault();
  $("settings").close();
});
$("forget-key").addEventListener("click", () => {
  store.saveKey("");
  $("settings").close();
  loadModels();
});

$("theme").addEventListener("click", () => {
  window.tandemTheme.set(window.tandemTheme.get() === "dark" ? "light" : "dark");
});
$("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));

// -- start --------------------------------------------------------------------------------------------

const latest = [...state.conversations].sort((a, b) => b.updated - a.updated)[0];
state.currentId = latest ? latest.id : null;
redraw();
loadModels();
