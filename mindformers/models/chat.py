"""ChatMixin: `chat` and `stream_chat` for the chat models (ChatGLM-6B, ChatGLM2-6B).

The model provides `generate`; the tokenizer provides `build_prompt(query, history)` (the family's prompt text),
`encode_prompt` (with the family's special tokens, no closing EOS) and `decode`."""
import threading


class ChatMixin:
    """Adds multi-turn chat on top of `generate()`; `history` is a list of (question, answer) pairs."""

    @staticmethod
    def _chat_prompt(tokenizer, query, history):
        return tokenizer.encode_prompt(tokenizer.build_prompt(query, history))

    def chat(self, tokenizer, query, history=None, **generate_kwargs):
        """(response, history + [(query, response)]) for one turn; `generate_kwargs` go to `generate` (the
        model config's generation defaults apply otherwise)."""
        history = list(history or [])
        ids = self._chat_prompt(tokenizer, query, history)
        output = self.generate([ids], **generate_kwargs)[0]
        response = tokenizer.decode(output[len(ids):], skip_special_tokens=True).strip()
        return response, history + [(query, response)]

    def stream_chat(self, tokenizer, query, history=None, timeout=None, **generate_kwargs):
        """Yield (response so far, history with this turn) as tokens arrive; the last item holds the full answer."""
        history = list(history or [])
        ids = self._chat_prompt(tokenizer, query, history)
        from mindformers.generation.streamers import TextIteratorStreamer  # generation/ builds on models/
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout)
        errors = []

        def run():
            try:
                self.generate([ids], streamer=streamer, **generate_kwargs)
            except Exception as err:  # pylint: disable=broad-except
                errors.append(err)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        response = ''
        for piece in streamer:
            response += piece
            yield response.strip(), history + [(query, response.strip())]
        worker.join()
        if errors:
            raise errors[0]
