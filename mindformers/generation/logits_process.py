"""Logits processors (HuggingFace semantics), vectorised over the batch in NumPy.

Each takes `scores` [rows, vocab] float32 and returns new scores; `sequences` [rows, length] int holds every token
seen so far (left padding included, as HuggingFace does)."""
import numpy as np

NEG_INF = -np.inf


def repetition_penalty(scores, sequences, penalty):
    """Tokens present in `sequences`: score / penalty when positive, score * penalty when negative."""
    if penalty == 1.0:
        return scores
    seen = np.take_along_axis(scores, sequences, axis=1)
    seen = np.where(seen < 0, seen * penalty, seen / penalty)
    scores = scores.copy()
    np.put_along_axis(scores, sequences, seen.astype(scores.dtype), axis=1)
    return scores


def suppress_eos(scores, eos_ids):
    """EOS scores set to -inf (while fewer than min_new_tokens have been generated)."""
    if not eos_ids:
        return scores
    scores = scores.copy()
    scores[:, eos_ids] = NEG_INF
    return scores


def temperature(scores, value):
    return scores if value == 1.0 else scores / np.float32(value)


def top_k(scores, k):
    """Keep the k highest scores of each row (and any tied with the k-th); k = 0 keeps all."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = np.partition(scores, -k, axis=-1)[:, -k][:, None]
    return np.where(scores < kth, NEG_INF, scores).astype(scores.dtype)


def top_p(scores, p):
    """Nucleus filter: drop the lowest-probability tokens whose total probability is at most 1 - p (always keep the
    most likely one)."""
    if p >= 1.0:
        return scores
    order = np.argsort(scores, axis=-1, kind='stable')  # ascending
    ordered = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(softmax(ordered), axis=-1)
    remove = cumulative <= 1 - p
    remove[:, -1] = False
    removed = np.zeros_like(remove)
    np.put_along_axis(removed, order, remove, axis=-1)
    return np.where(removed, NEG_INF, scores).astype(scores.dtype)


def softmax(scores):
    shifted = scores - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def log_softmax(scores):
    shifted = scores - scores.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def sample(scores, rng):
    """One token per row drawn from softmax(scores) with `rng` (a numpy Generator)."""
    cumulative = np.cumsum(softmax(scores.astype(np.float64)), axis=-1)
    draws = rng.random(scores.shape[0]) * cumulative[:, -1]
    tokens = (cumulative < draws[:, None]).sum(axis=-1)
    return np.minimum(tokens, scores.shape[-1] - 1)


def process(scores, sequences, generated, config):
    """The processors HuggingFace applies to raw logits, in its order: repetition penalty, then EOS suppression
    while `generated` < min_new_tokens."""
    scores = repetition_penalty(scores, sequences, float(config.repetition_penalty))
    if generated < int(config.min_new_tokens):
        scores = suppress_eos(scores, config.eos_token_ids)
    return scores


def warp(scores, config):
    """The sampling warpers in HuggingFace's order: temperature, top-k, top-p."""
    scores = temperature(scores, float(config.temperature))
    scores = top_k(scores, int(config.top_k))
    return top_p(scores, float(config.top_p))
