"""Beam search with HuggingFace's semantics (length_penalty, early_stopping True / False / 'never'), in NumPy.

Scores are sums of log-probabilities; a finished hypothesis is ranked by score / generated_length ** length_penalty.
Each step keeps the best `2 * num_beams` (more with several EOS ids) continuations: those ending in EOS (or reaching
max_length) may enter the finished set, the best `num_beams` others keep running."""
import numpy as np

from mindformers.generation.logits_process import log_softmax, process

_OFF = -1.0e9


def _take(array, indices):
    """array [B, n, ...] gathered along axis 1 by indices [B, k]."""
    return np.take_along_axis(array, indices.reshape(indices.shape + (1,) * (array.ndim - 2)), axis=1)


def _top(scores, k):
    """Indices [B, k] of the k highest scores per row, best first (ties: lower index first)."""
    return np.argsort(-scores, axis=1, kind='stable')[:, :k]


def beam_search(stepper, prompt, config, max_new_tokens):
    """Best hypothesis per prompt. `prompt` [B, P] left-padded ids (pad filled); `stepper` decodes B * num_beams
    rows (see text_generator); returns a list of B int arrays: prompt row (padding included) + new tokens."""
    batch, prompt_len = prompt.shape
    beams = int(config.num_beams)
    eos_ids = config.eos_token_ids
    keep = max(2, 1 + len(eos_ids)) * beams
    max_length = prompt_len + max_new_tokens
    length_penalty, early_stopping = float(config.length_penalty), config.early_stopping
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)

    running = np.full((batch, beams, max_length), pad, np.int64)
    running[:, :, :prompt_len] = prompt[:, None, :]
    running_scores = np.zeros((batch, beams), np.float32)
    running_scores[:, 1:] = _OFF
    finished = running.copy()
    finished_scores = np.full((batch, beams), _OFF, np.float32)
    finished_lengths = np.full((batch, beams), max_length, np.int64)
    is_finished = np.zeros((batch, beams), bool)
    improvable = np.ones((batch, 1), bool)
    first_beams = np.arange(keep) < beams

    logits = stepper.start()
    cur_len = prompt_len
    while True:
        log_probs = log_softmax(logits.astype(np.float32))
        log_probs = process(log_probs, running[:, :, :cur_len].reshape(batch * beams, cur_len),
                            cur_len - prompt_len, config)
        vocab = log_probs.shape[-1]
        totals = (log_probs.reshape(batch, beams, vocab) + running_scores[:, :, None]).reshape(batch, -1)
        chosen = _top(totals, keep)
        top_scores = np.take_along_axis(totals, chosen, axis=1)
        source, tokens = chosen // vocab, chosen % vocab
        candidates = _take(running, source).copy()
        candidates[:, :, cur_len] = tokens
        ends = np.isin(tokens, eos_ids) | (cur_len + 1 >= max_length)

        # the best candidates that did not end keep running
        open_scores = top_scores + ends.astype(np.float32) * _OFF
        best_open = _top(open_scores, beams)
        running = _take(candidates, best_open)
        running_scores = np.take_along_axis(open_scores, best_open, axis=1)
        parents = np.take_along_axis(source, best_open, axis=1)

        # candidates among the first num_beams that ended may replace worse finished hypotheses
        just_finished = ends & first_beams[None, :]
        normalized = top_scores / np.float32((cur_len + 1 - prompt_len) ** length_penalty)
        normalized = normalized + (is_finished.all(axis=1, keepdims=True) & (early_stopping is True)) * _OFF
        normalized = normalized + (~improvable) * _OFF + (~just_finished) * _OFF
        merged_scores = np.concatenate([finished_scores, normalized.astype(np.float32)], axis=1)
        best = _top(merged_scores, beams)
        finished = _take(np.concatenate([finished, candidates], axis=1), best)
        finished_scores = np.take_along_axis(merged_scores, best, axis=1)
        finished_lengths = np.take_along_axis(
            np.concatenate([finished_lengths, np.full((batch, keep), cur_len + 1)], axis=1), best, axis=1)
        is_finished = np.take_along_axis(np.concatenate([is_finished, just_finished], axis=1), best, axis=1)

        cur_len += 1
        if early_stopping == 'never' and length_penalty > 0:
            best_length = max_length - prompt_len
        else:
            best_length = cur_len - prompt_len
        best_possible = running_scores[:, :1] / np.float32(best_length ** length_penalty)
        worst_finished = np.where(is_finished, finished_scores.min(axis=1, keepdims=True), _OFF)
        improvable = improvable & (best_possible > worst_finished).any(axis=-1, keepdims=True)
        all_closed = is_finished.all() and early_stopping is True
        if not improvable.any() or all_closed or ends.all():
            break
        rows = (np.arange(batch)[:, None] * beams + parents).reshape(-1)
        logits = stepper.step(running[:, :, cur_len - 1].reshape(-1), rows)
    return [finished[b, 0, :finished_lengths[b, 0]] for b in range(batch)]
