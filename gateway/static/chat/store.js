// What the page keeps in this browser's localStorage: conversations, settings, the API key. Nothing of it
// reaches the server but the messages of the conversation being answered.

const CONVERSATIONS = "tandem.chat.conversations";
const SETTINGS = "tandem.chat.settings";
const API_KEY = "tandem.chat.apiKey";
const EXPORT_FORMAT = "tandem-chat";

// A 135M model rambles at temperature 1; empty (null) fields are left to the server.
export const DEFAULT_SETTINGS = { model: "", system: "", temperature: 0.7, top_p: 0.95, max_tokens: 1024 };

function read(key, fallback) {
  try {
    const text = localStorage.getItem(key);
    return text === null ? fallback : JSON.parse(text);
  } catch {
    return fallback; // unreadable or not JSON: start over rather than break the page
  }
}

export function loadSettings() {
  return { ...DEFAULT_SETTINGS, ...read(SETTINGS, {}) };
}

export function saveSettings(settings) {
  localStorage.setItem(SETTINGS, JSON.stringify(settings));
}

export function loadKey() {
  return localStorage.getItem(API_KEY) || "";
}

export function saveKey(key) {
  if (key) localStorage.setItem(API_KEY, key);
  else localStorage.removeItem(API_KEY);
}

// crypto.randomUUID exists only in secure contexts, and tandem is often reached over plain http on a LAN.
export function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
}

export function newConversation() {
  const now = Date.now();
  return { id: newId(), title: "New chat", created: now, updated: now, model: "", system: "", messages: [] };
}

// Only the fields the page knows, with the types it expects: an imported file is as untrusted as an answer.
function cleanMessage(raw) {
  if (!raw || (raw.role !== "user" && raw.role !== "assistant") || typeof raw.content !== "string") return null;
  const message = { role: raw.role, content: raw.content };
  for (const field of ["reasoning", "state", "error", "model", "finish"]) {
    if (typeof raw[field] === "string") message[field] = raw[field];
  }
  for (const field of ["tokens", "seconds"]) {
    if (typeof raw[field] === "number" && Number.isFinite(raw[field])) message[field] = raw[field];
  }
  if (message.state === "streaming") message.state = "stopped"; // the page went away mid-answer
  return message;
}

function cleanConversation(raw) {
  if (!raw || typeof raw.id !== "string" || !Array.isArray(raw.messages)) return null;
  const text = (value, fallback) => (typeof value === "string" ? value : fallback);
  const time = (value) => (typeof value === "number" && Number.isFinite(value) ? value : Date.now());
  return {
    id: raw.id,
    title: text(raw.title, "Imported chat"),
    created: time(raw.created),
    updated: time(raw.updated),
    model: text(raw.model, ""),
    system: text(raw.system, ""),
    messages: raw.messages.map(cleanMessage).filter(Boolean),
  };
}

function cleanList(list) {
  return Array.isArray(list) ? list.map(cleanConversation).filter(Boolean) : [];
}

export function loadConversations() {
  return cleanList(read(CONVERSATIONS, []));
}

// Throws (QuotaExceededError) when the browser's storage is full; the caller says so.
export function saveConversations(list) {
  localStorage.setItem(CONVERSATIONS, JSON.stringify(list));
}

export function exportText(list) {
  const body = { format: EXPORT_FORMAT, version: 1, exported: new Date().toISOString(), conversations: list };
  return JSON.stringify(body, null, 2);
}

// Takes this page's export, or a bare list of conversations. Throws on a file that is not JSON.
export function parseImport(text) {
  const body = JSON.parse(text);
  return cleanList(Array.isArray(body) ? body : body && body.conversations);
}
