// Drawing conversations: the sidebar list and the messages. Model text only ever reaches the page through
// renderMarkdown (sanitized) or textContent.
import { renderMarkdown } from "./markdown.js";

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, action, className) {
  const node = element("button", className, label);
  node.type = "button";
  node.dataset.action = action;
  return node;
}

export function renderSidebar(list, currentId, handlers) {
  const items = [...list]
    .sort((a, b) => b.updated - a.updated)
    .map((conversation) => {
      const item = element("li", conversation.id === currentId ? "current" : "");
      const open = button(conversation.title, "open", "title");
      open.title = conversation.title;
      open.addEventListener("click", () => handlers.open(conversation.id));
      const remove = button("×", "delete", "icon");
      remove.setAttribute("aria-label", `Delete “${conversation.title}”`);
      remove.addEventListener("click", () => handlers.remove(conversation.id));
      item.append(open, remove);
      return item;
    });
  document.getElementById("conversations").replaceChildren(...items);
}

function statsText(message) {
  const parts = [];
  if (message.state === "stopped") parts.push("stopped");
  if (message.finish === "length") parts.push("cut at the token limit");
  if (message.tokens) parts.push(`${message.tokens} tokens`);
  if (message.tokens > 1 && message.seconds > 0) {
    parts.push(`${((message.tokens - 1) / message.seconds).toFixed(1)} tok/s`);
  }
  return parts.join(" · ");
}

function thinkingSummary(message) {
  return message.state === "streaming" && !message.content ? "Thinking…" : "Thinking";
}

// Fills an assistant message's parts from `message`; called on every frame while it streams.
export function updateAssistant(article, message) {
  article.dataset.state = message.state || "done";
  const thinking = article.querySelector(".thinking");
  if (message.reasoning) {
    thinking.hidden = false;
    thinking.querySelector("summary").textContent = thinkingSummary(message);
    if (message.content && message.state === "streaming" && !thinking.dataset.folded) {
      thinking.open = false; // the answer has begun: fold the thinking away, once (the reader may reopen it)
      thinking.dataset.folded = "yes";
    }
    renderMarkdown(thinking.querySelector(".thinking-body"), message.reasoning);
  }
  renderMarkdown(article.querySelector(".content"), message.content);
  article.querySelector(".error").textContent = message.error || "";
  article.querySelector(".error").hidden = !message.error;
  article.querySelector(".stats").textContent = statsText(message);
}

function userMessage(message, index, handlers, busy) {
  const article = element("article", "message user");
  article.dataset.index = index;
  article.append(element("div", "role", "You"), element("div", "content plain", message.content));
  const footer = element("div", "footer");
  const edit = button("Edit", "edit");
  edit.disabled = busy;
  edit.addEventListener("click", () => startEdit(article, message, index, handlers));
  footer.append(element("span", "stats"), edit);
  article.append(footer);
  return article;
}

function startEdit(article, message, index, handlers) {
  const editor = element("textarea", "editor");
  editor.value = message.content;
  editor.rows = Math.min(12, message.content.split("\n").length + 1);
  const send = button("Send", "save-edit", "primary");
  const cancel = button("Cancel", "cancel-edit");
  send.addEventListener("click", () => editor.value.trim() && handlers.edit(index, editor.value));
  cancel.addEventListener("click", () => handlers.redraw());
  const actions = element("div", "footer");
  actions.append(element("span", "stats"), cancel, send);
  article.replaceChildren(element("div", "role", "You"), editor, actions);
  editor.focus();
}

function assistantMessage(message, index, handlers, busy) {
  const article = element("article", "message assistant");
  article.dataset.index = index;
  const thinking = element("details", "thinking");
  thinking.hidden = true;
  // Open while the model thinks and has not begun its answer; closed once read or reloaded.
  thinking.open = message.state === "streaming" && !message.content;
  thinking.append(element("summary", "", "Thinking"), element("div", "thinking-body markdown"));
  const footer = element("div", "footer");
  const regenerate = button("Regenerate", "regenerate");
  regenerate.disabled = busy;
  regenerate.hidden = message.state === "streaming";
  regenerate.addEventListener("click", () => handlers.regenerate(index));
  footer.append(element("span", "stats"), regenerate);
  const error = element("p", "error");
  article.append(element("div", "role", message.model || "assistant"), thinking);
  article.append(element("div", "content markdown"), error, footer);
  updateAssistant(article, message);
  return article;
}

export function renderMessages(conversation, handlers, busy) {
  const messages = conversation ? conversation.messages : [];
  const nodes = messages.map((message, index) =>
    message.role === "user"
      ? userMessage(message, index, handlers, busy)
      : assistantMessage(message, index, handlers, busy),
  );
  const container = document.getElementById("messages");
  const empty = document.getElementById("empty");
  empty.hidden = nodes.length > 0;
  container.replaceChildren(empty, ...nodes);
}
