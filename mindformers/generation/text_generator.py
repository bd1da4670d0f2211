"""generate(): greedy, sampling and beam search over any causal LM of the suite (`model.generate` calls it).

The model side is its one forward (see `models/base_model.CausalLMModel`): eval-mode `model(input_ids,
attention_mask)` -> logits [B, S, V] with HF padding semantics, and, for `use_past`, the same forward over a
`DecodingSession` (a KV cache with one slot per row: prefill / decode / reorder). Everything here is host-side NumPy
on [rows, vocab] arrays."""
import numpy as np
import mindspore as ms

from mindformers.generation.beam_search import beam_search
from mindformers.generation.generation_config import GenerationConfig
from mindformers.generation.logits_process import process, sample, warp
from mindformers.generation.session import left_padded, prefill_bucket, session_for
from mindformers.tools.utils import check_unicode


class _CachedStepper:
    """Decoding with the model's KV cache: one prefill, then one compiled single-token step per token."""

    def __init__(self, model, prompt, mask, max_new_tokens):
        self.session = session_for(model, prompt.shape[0])
        self.prompt, self.mask = prompt, mask
        capacity = int(model.config.seq_length)
        # the prompt is padded to a compiled bucket; use a tighter one when the bucket leaves too little room
        bucket = prefill_bucket(prompt.shape[1], capacity)
        self.bucket = bucket if bucket + max_new_tokens <= capacity else capacity - max_new_tokens

    def start(self):
        return self.session.prefill(np.arange(self.prompt.shape[0]), self.prompt, self.mask, bucket=self.bucket)

    def step(self, tokens, rows=None):
        if rows is not None and not np.array_equal(rows, np.arange(len(rows))):
            self.session.reorder(rows)
        return self.session.decode(tokens)


class _RecomputeStepper:
    """Decoding by full recomputation on one static shape: a [rows, seq_length] window holding the tokens
    right-aligned (left padding masked), shifted left by one per new token."""

    def __init__(self, model, prompt, mask, max_new_tokens):
        rows, length = prompt.shape
        self.model, width = model, int(model.config.seq_length)
        self.ids = np.zeros((rows, width), np.int32)
        self.mask = np.zeros((rows, width), np.int32)
        self.ids[:, width - length:], self.mask[:, width - length:] = prompt, mask

    def _logits(self):
        logits = self.model(ms.Tensor(self.ids), ms.Tensor(self.mask))
        return (logits[0] if isinstance(logits, tuple) else logits)[:, -1].asnumpy()

    def start(self):
        return self._logits()

    def step(self, tokens, rows=None):
        if rows is not None:
            self.ids, self.mask = self.ids[rows], self.mask[rows]
        self.ids = np.concatenate([self.ids[:, 1:], np.asarray(tokens, np.int32)[:, None]], axis=1)
        self.mask = np.concatenate([self.mask[:, 1:], np.ones((len(tokens), 1), np.int32)], axis=1)
        return self._logits()


class _BeamStepper:
    """A stepper over B * num_beams rows, each prompt repeated num_beams times."""

    def __init__(self, stepper_cls, model, prompt, mask, max_new_tokens, beams):
        self.inner = stepper_cls(model, np.repeat(prompt, beams, axis=0), np.repeat(mask, beams, axis=0),
                                 max_new_tokens)

    def start(self):
        return self.inner.start()

    def step(self, tokens, rows):
        return self.inner.step(tokens, rows)


def _as_prompts(input_ids):
    """A list of int lists from a list of lists (ragged allowed), one flat list, or a 1-/2-D array or Tensor."""
    if hasattr(input_ids, 'asnumpy'):
        input_ids = input_ids.asnumpy()
    rows = input_ids.tolist() if hasattr(input_ids, 'tolist') else list(input_ids)
    if rows and not isinstance(rows[0], (list, tuple)):
        rows = [rows]
    prompts = [[int(t) for t in row] for row in rows]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate() needs at least one non-empty prompt in input_ids")
    return prompts


def check_prompt_ids(ids, vocab_size, name):
    """Raise ValueError naming `name` (e.g. "prompt 2") and the id when a token id lies outside [0, vocab_size)."""
    for position, token in enumerate(ids):
        if not 0 <= token < vocab_size:
            raise ValueError(f"{name} has token id {token} at position {position}, outside the model's vocabulary "
                             f"[0, {vocab_size}); pass ids of the model's tokenizer")


def encode_prompt(tokenizer, text, vocab_size, index=None):
    """The ids generate() continues for the prompt `text` (`tokenizer.encode_prompt`: BOS as the tokenizer adds it,
    no closing EOS), checked: valid text, at least one token, every id inside the model's vocabulary. Errors name
    the prompt (`index` in the caller's list, if given) and its text."""
    name = 'prompt' if index is None else f"prompt {index}"
    ids = tokenizer.encode_prompt(check_unicode(text, name) if isinstance(text, str) else text)
    if not ids:
        raise ValueError(f"{name} {text!r} encodes to no tokens; give at least one token of text")
    check_prompt_ids(ids, vocab_size, f"{name} {text[:40]!r} (tokenizer {type(tokenizer).__name__})")
    return ids


def generate(model, input_ids, generation_config=None, streamer=None, seed=None, **kwargs):
    """Continue each prompt with `model` (a causal LM of the suite).

    input_ids: a list of token-id lists (ragged: they are left-padded), one list, or a 2-D array / Tensor.
    generation_config: a GenerationConfig (default: from the model config); `kwargs` override its fields.
    streamer: gets `put(prompt ids [1, P])`, then `put(token [1])` per new token, then `end()` (batch 1, no beams).
    seed: makes sampling reproducible, independent of any global random state.
    Returns a list (one per prompt) of int lists: the prompt followed by its new tokens, up to and including the
    first EOS."""
    config = copy_config(generation_config or GenerationConfig.from_model_config(model.config)).update(**kwargs)
    config.validate()
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_ids[0] if config.eos_token_ids else 0
    prompts = _as_prompts(input_ids)
    for index, ids in enumerate(prompts):
        check_prompt_ids(ids, int(model.config.vocab_size), f"generate(): prompt {index} of input_ids")
    width = max(len(p) for p in prompts)
    max_new_tokens = new_token_budget(config, width, int(model.config.seq_length))
    if streamer is not None and (len(prompts) > 1 or config.num_beams > 1):
        raise ValueError("a streamer needs a single prompt and num_beams=1 "
                         f"(got {len(prompts)} prompts, num_beams={config.num_beams})")

    prompt, mask = left_padded(prompts, width, config.pad_token_id, np.int64)
    stepper_cls = _CachedStepper if config.use_past else _RecomputeStepper
    was_training = model.training
    model.set_train(False)
    try:
        if config.num_beams > 1:
            stepper = _BeamStepper(stepper_cls, model, prompt, mask, max_new_tokens, config.num_beams)
            rows = beam_search(stepper, prompt, config, max_new_tokens)
            return [list(map(int, row[width - len(p):])) for row, p in zip(rows, prompts)]
        stepper = stepper_cls(model, prompt, mask, max_new_tokens)
        new = _decode(stepper, prompt, config, max_new_tokens, np.random.default_rng(seed), streamer)
    finally:
        model.set_train(was_training)
        if streamer is not None:
            streamer.end()
    return [p + row for p, row in zip(prompts, new)]


class GeneratorMixin:
    """Adds `generate()` (the function above) to a causal LM of one's own."""

    def generate(self, input_ids, generation_config=None, streamer=None, seed=None, **kwargs):
        return generate(self, input_ids, generation_config, streamer, seed, **kwargs)


def new_token_budget(config, width, seq_length):
    """How many tokens to generate after a prompt padded to `width`, checked against the model's seq_length."""
    if width >= seq_length:
        raise ValueError(f"prompt of {width} tokens leaves no room to generate: the model's seq_length is "
                         f"{seq_length}; shorten the prompt or use a model with a longer seq_length")
    if config.max_new_tokens is not None:
        budget = int(config.max_new_tokens)
        if width + budget > seq_length:
            raise ValueError(f"max_new_tokens={budget} after a prompt of {width} tokens exceeds the model's "
                             f"seq_length {seq_length}; use at most max_new_tokens={seq_length - width}")
        return budget
    max_length = int(config.max_length)
    if max_length > seq_length:
        if config.is_explicit('max_length'):
            raise ValueError(f"max_length={max_length} exceeds the model's seq_length {seq_length}")
        max_length = seq_length  # a model-config default larger than the model: cap it, as MindFormers does
    if max_length <= width:
        raise ValueError(f"max_length={max_length} leaves no room after a prompt of {width} tokens; "
                         f"raise max_length or set max_new_tokens")
    return max_length - width


def copy_config(config):
    """A copy of `config` that generate() may change."""
    clone = GenerationConfig(**config.to_dict())
    clone._explicit = set(config._explicit)
    return clone


def _decode(stepper, prompt, config, max_new_tokens, rng, streamer):
    """Greedy or sampled decoding; returns the new tokens of each row (through its first EOS)."""
    rows = prompt.shape[0]
    eos_ids = np.array(config.eos_token_ids, np.int64)
    sequences = prompt
    done = np.zeros(rows, bool)
    lengths = np.full(rows, max_new_tokens)
    if streamer is not None:
        streamer.put(prompt.copy())
    logits = stepper.start()
    for step in range(max_new_tokens):
        scores = process(logits.astype(np.float32), sequences, step, config)
        tokens = sample(warp(scores, config), rng) if config.do_sample else scores.argmax(axis=-1)
        tokens = np.where(done, config.pad_token_id, tokens).astype(np.int64)
        sequences = np.concatenate([sequences, tokens[:, None]], axis=1)
        if streamer is not None:
            streamer.put(tokens.copy())
        ended = ~done & np.isin(tokens, eos_ids)
        lengths[ended] = step + 1
        done |= ended
        if done.all() or step + 1 == max_new_tokens:
            break
        logits = stepper.step(tokens)
    new = sequences[:, prompt.shape[1]:]
    return [list(map(int, new[row, :lengths[row]])) for row in range(rows)]
