"""Streamers: receive token ids from generate() as they are produced and turn them into text.

Protocol (as HuggingFace's): `put(ids)` is called first with the prompt ([1, P] or [P]), then with each new token
([1] or a scalar), and `end()` once at the end. Only one sequence can be streamed."""
import queue

import numpy as np


class BaseStreamer:
    def put(self, value):
        raise NotImplementedError

    def end(self):
        raise NotImplementedError


class TextStreamer(BaseStreamer):
    """Prints text to stdout as whole words form: text is held back until a space or newline closes a word (or an
    incomplete UTF-8 character completes). `skip_prompt` leaves the prompt out; `decode_kwargs` go to
    `tokenizer.decode` (e.g. `skip_special_tokens=True`)."""

    def __init__(self, tokenizer, skip_prompt=False, **decode_kwargs):
        self.tokenizer, self.skip_prompt, self.decode_kwargs = tokenizer, skip_prompt, decode_kwargs
        self.tokens, self.printed, self.prompt_pending = [], 0, True

    def put(self, value):
        ids = np.asarray(value).reshape(-1) if np.ndim(value) <= 1 else np.asarray(value)
        if ids.ndim > 1:
            if ids.shape[0] > 1:
                raise ValueError("TextStreamer streams one sequence; got a batch of "
                                 f"{ids.shape[0]} (use batch size 1 or no streamer)")
            ids = ids[0]
        if self.prompt_pending:
            self.prompt_pending = False
            if self.skip_prompt:
                return
        self.tokens.extend(int(t) for t in ids)
        text = self.tokenizer.decode(self.tokens, **self.decode_kwargs)
        if text.endswith('\n'):
            ready = text[self.printed:]
            self.tokens, self.printed = [], 0
        elif text.endswith('\ufffd'):
            return  # an incomplete multi-byte character: wait for the rest
        else:
            cut = text.rfind(' ') + 1
            ready = text[self.printed:cut] if cut > self.printed else ''
            self.printed += len(ready)
        if ready:
            self.on_text(ready)

    def end(self):
        """Flush what is left and finish the line."""
        text = self.tokenizer.decode(self.tokens, **self.decode_kwargs) if self.tokens else ''
        rest = text[self.printed:]
        self.tokens, self.printed, self.prompt_pending = [], 0, True
        self.on_text(rest, stream_end=True)

    def on_text(self, text, stream_end=False):
        print(text, flush=True, end='' if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """Iterate over text pieces from another thread: `for text in streamer: ...` while generate() runs elsewhere.
    Waiting longer than `timeout` seconds for the next piece raises `queue.Empty`."""

    _STOP = object()

    def __init__(self, tokenizer, skip_prompt=False, timeout=None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.queue, self.timeout = queue.Queue(), timeout

    def on_text(self, text, stream_end=False):
        if text:
            self.queue.put(text)
        if stream_end:
            self.queue.put(self._STOP)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.queue.get(timeout=self.timeout)
        if item is self._STOP:
            raise StopIteration
        return item
