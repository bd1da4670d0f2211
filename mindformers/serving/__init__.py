"""Serving: the continuous-batching engine, the OpenAI-compatible HTTP server and the chat page (`python -m
mindformers.serve`). Nothing here is imported by `import mindformers`; the server needs the `serve` extra."""
