"""A first, plain text generator: greedy or top-k/top-p sampling by full recomputation on a static shape.

Every step runs the model on `[batch, seq_length]` (prompts right-padded), so one compiled graph serves the whole
generation. The KV-cache engine replaces this in the generation issue; the call signature stays."""
import numpy as np
import mindspore as ms


class GeneratorMixin:
    """Adds `generate()` to a causal LM whose `construct(input_ids)` returns logits `[B, S, V]` in eval mode."""

    def generate(self, input_ids, max_length=None, max_new_tokens=None, do_sample=None, top_k=None, top_p=None,
                 temperature=1.0, eos_token_id=None, pad_token_id=None, seed=None, streamer=None, **kwargs):
        """Continue each prompt. `input_ids`: a list of token-id lists (ragged) or a 2-D array.

        Returns a list of int lists, each the prompt followed by its new tokens (stopping after EOS)."""
        if kwargs:
            raise TypeError(f"generate() got unsupported argument(s): {', '.join(sorted(kwargs))}")
        config = self.config
        seq_length = int(config.seq_length)
        prompts = [list(map(int, row)) for row in (input_ids.tolist() if hasattr(input_ids, 'tolist') else input_ids)]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate() needs at least one non-empty prompt")
        longest = max(len(p) for p in prompts)
        if longest > seq_length:
            raise ValueError(f"prompt of {longest} tokens is longer than the model's seq_length {seq_length}")
        if max_new_tokens is not None:
            if int(max_new_tokens) < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
            max_length = longest + int(max_new_tokens)
        max_length = int(max_length if max_length is not None else getattr(config, 'max_decode_length', seq_length))
        max_length = min(max_length, seq_length)
        do_sample = getattr(config, 'do_sample', False) if do_sample is None else do_sample
        top_k = int(getattr(config, 'top_k', 0) if top_k is None else top_k)
        top_p = float(getattr(config, 'top_p', 1.0) if top_p is None else top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        eos = getattr(config, 'eos_token_id', None) if eos_token_id is None else eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        pad = int(getattr(config, 'pad_token_id', 0) if pad_token_id is None else pad_token_id)
        rng = np.random.default_rng(seed)

        was_training = self.training
        self.set_train(False)
        batch = len(prompts)
        tokens = np.full((batch, seq_length), pad, dtype=np.int32)
        lengths = np.array([len(p) for p in prompts])
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        finished = np.zeros(batch, dtype=bool)
        outputs = [list(p) for p in prompts]
        try:
            while not finished.all() and lengths[~finished].min() < max_length:
                logits = self(ms.Tensor(tokens))
                logits = (logits[0] if isinstance(logits, tuple) else logits).asnumpy()
                for i in np.nonzero(~finished)[0]:
                    if lengths[i] >= max_length:
                        finished[i] = True
                        continue
                    token = _choose(logits[i, lengths[i] - 1].astype(np.float64), do_sample, top_k, top_p,
                                    temperature, rng)
                    tokens[i, lengths[i]] = token
                    lengths[i] += 1
                    outputs[i].append(token)
                    if token in eos_ids:
                        finished[i] = True
                if streamer is not None:
                    streamer.put(np.array([[o[-1]] for o in outputs]))
        finally:
            self.set_train(was_training)
            if streamer is not None:
                streamer.end()
        return outputs


def _choose(logits, do_sample, top_k, top_p, temperature, rng):
    if not do_sample:
        return int(np.argmax(logits))
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[:int(np.searchsorted(cumulative, top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(len(probs), p=probs))
