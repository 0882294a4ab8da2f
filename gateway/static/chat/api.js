// tandem's OpenAI routes as the page uses them: the model list, and chat completions streamed as
// server-sent events (thinking arrives as `delta.reasoning_content`, the answer as `delta.content`).

export class AuthError extends Error {}
export class ApiError extends Error {}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    message = (body.error && (body.error.message || body.error)) || message;
  } catch {
    // not JSON (a proxy's error page): keep the status line
  }
  return response.status === 401 ? new AuthError(String(message)) : new ApiError(String(message));
}

// `data: …` lines, events apart by a blank line, `data: [DONE]` last. A failure mid-stream is one
// `data: {"error": …}` event. A stream that stops before [DONE] was cut (a worker or the network died).
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new ApiError("The answer was cut off: the stream ended early");
      buffer += value;
      const blocks = buffer.split(/\r?\n\r?\n/);
      buffer = blocks.pop();
      for (const block of blocks) {
        const data = block
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(event.error.message || String(event.error));
        yield event;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

export class Api {
  constructor(getKey) {
    this.getKey = getKey;
  }

  headers() {
    const headers = { "content-type": "application/json" };
    const key = this.getKey();
    if (key) headers.authorization = `Bearer ${key}`;
    return headers;
  }

  async models() {
    const response = await fetch("v1/models", { headers: this.headers() });
    if (!response.ok) throw await failure(response);
    const body = await response.json();
    // Embedding models answer no chat: tandem marks them in its `capabilities` extension.
    const chats = body.data.filter((model) => !(model.capabilities || []).includes("embedding"));
    return chats.map((model) => model.id);
  }

  // Yields each chunk of the stream. Aborting `signal` closes the connection: tandem sees the client leave
  // and frees the sequence in the worker.
  async *chat(body, signal) {
    const init = { method: "POST", headers: this.headers(), body: JSON.stringify(body), signal };
    const response = await fetch("v1/chat/completions", init);
    if (!response.ok) throw await failure(response);
    yield* events(response.body);
  }
}
