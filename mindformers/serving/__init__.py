"""Serving: the continuous-batching engine, the OpenAI-compatible HTTP server and the chat page."""
