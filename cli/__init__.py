"""Client-side commands of the launcher: `batch` (OpenAI Batch files) and `chat` (a terminal chat)."""
