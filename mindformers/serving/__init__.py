"""Serving: the continuous-batching engine (`engine`), the OpenAI-compatible HTTP server (`app`, `protocol`, `chat`)
and its command line (`cli`, `python -m mindformers.serve`). Nothing here is imported by `import mindformers`."""
