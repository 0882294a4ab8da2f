// Model output is untrusted: Markdown goes to HTML with marked, code is highlighted by highlight.js, and
// DOMPurify cleans the result before it touches the page (the page's CSP is the second wall).
import DOMPurify from "./vendor/dompurify/purify.es.mjs";
import hljs from "./vendor/highlight.js/highlight.min.js";
import { Marked } from "./vendor/marked/marked.esm.js";

const AUTO_DETECT_LIMIT = 20000; // characters: guessing the language of more costs too much per frame

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function highlight(code, lang) {
  const named = (lang || "").match(/^[\w+#.-]+/);
  if (named && hljs.getLanguage(named[0])) {
    return { html: hljs.highlight(code, { language: named[0], ignoreIllegals: true }).value, language: named[0] };
  }
  if (code.length > AUTO_DETECT_LIMIT) return { html: escapeHtml(code), language: "" };
  const guess = hljs.highlightAuto(code);
  return { html: guess.value, language: guess.language || "" };
}

const marked = new Marked({
  gfm: true,
  renderer: {
    code({ text, lang }) {
      const { html, language } = highlight(text, lang);
      const label = language ? ` language-${language}` : "";
      return `<pre><code class="hljs${label}">${html}</code></pre>\n`;
    },
  },
});

// Beyond DOMPurify's defaults (no scripts, no event handlers, no javascript: URLs): no styles and no form
// controls, so an answer can neither restyle the page nor draw a fake key prompt inside it.
const PURIFY = {
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option", "dialog"],
  FORBID_ATTR: ["style"],
  ALLOW_DATA_ATTR: false,
  RETURN_DOM_FRAGMENT: true, // no second parse of a sanitized string (mutation XSS)
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

// Replaces `element`'s children with `text` rendered. A half-written answer renders too (marked closes
// what is open), so a stream shows formatted text as it arrives.
export function renderMarkdown(element, text) {
  element.replaceChildren(DOMPurify.sanitize(marked.parse(text), PURIFY));
}
