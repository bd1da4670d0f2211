"""What an evaluation metric declares so the Trainer can feed it and merge it across ranks.

A metric is a `mindspore.train.Metric` (`clear()`, `update(*inputs)`, `eval() -> dict`) with two class attributes:

  consumes   'loss'    update(loss_sum, token_count): summed next-token cross-entropy (nats) of a batch and the
                       number of tokens counted, two Python floats;
             'logits'  update(logits, labels, mask): NumPy float32 logits [B, S, V] of the inputs' first S tokens,
                       int32 next-token labels [B, S] and float32 mask [B, S] (1 where the token counts);
             'text'    update(predictions, references): two lists of str, the decoded continuation generated for
                       each eval prompt and its reference.
  rank_sums  names of the state attributes that are sums over samples (numbers, or dicts of numbers); under data
             parallel each is added over the ranks before `eval()`, so every rank reports the global result.

The Trainer feeds a metric exactly what it declares and refuses one that declares nothing; it never substitutes one
metric for another.
"""
__all__ = ['CONSUMES', 'metric_inputs', 'merge_rank_sums']

CONSUMES = {
    'loss': "update(loss_sum, token_count)",
    'logits': "update(logits [B, S, V], labels [B, S], mask [B, S])",
    'text': "update(predictions, references)",
}


def metric_inputs(metric, where='metric'):
    """`metric.consumes` after checking the declaration; ValueError naming `where` and what to declare."""
    name = type(metric).__name__
    consumes = getattr(metric, 'consumes', None)
    sums = getattr(metric, 'rank_sums', None)
    problems = []
    if not isinstance(consumes, str) or consumes not in CONSUMES:
        problems.append("it declares no `consumes`" if consumes is None else f"consumes = {consumes!r} is not one of "
                        f"{', '.join(map(repr, CONSUMES))}")
    if not isinstance(sums, (tuple, list)) or not all(isinstance(s, str) for s in sums):
        problems.append("it declares no `rank_sums`" if sums is None else
                        f"rank_sums = {sums!r} is not a tuple of attribute names")
    elif any(not hasattr(metric, s) for s in sums):
        problems.append(f"rank_sums names {[s for s in sums if not hasattr(metric, s)]}, which it does not have")
    if problems:
        kinds = '; '.join(f"{key!r} -> {call}" for key, call in CONSUMES.items())
        raise ValueError(f"{where}: {name} cannot be computed by evaluation: {' and '.join(problems)}. Give its class "
                         f"consumes = 'loss', 'logits' or 'text' (what evaluation then calls: {kinds}) and rank_sums "
                         f"= the names of its state attributes that are sums over samples (added over data-parallel "
                         f"ranks before eval()), e.g. rank_sums = ('total', 'count')")
    return consumes


def merge_rank_sums(metric, add):
    """Replace each `metric.rank_sums` attribute by its sum over the ranks: `add(list of floats)` returns the
    element-wise sums (e.g. `core.context.sum_over_ranks`). Ints stay ints; dicts keep their keys."""
    names = list(metric.rank_sums)
    values = [getattr(metric, name) for name in names]
    flat = [float(v) for value in values for v in (value.values() if isinstance(value, dict) else [value])]
    summed = iter(float(v) for v in add(flat))
    for name, value in zip(names, values):
        if isinstance(value, dict):
            merged = {key: _like(item, next(summed)) for key, item in value.items()}
        else:
            merged = _like(value, next(summed))
        setattr(metric, name, merged)


def _like(original, total):
    return int(round(total)) if isinstance(original, int) and not isinstance(original, bool) else total
