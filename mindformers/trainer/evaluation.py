"""Evaluation: which metric a run computes, and feeding it what it declares it consumes (`core.metric.contract`):
loss sums, logits, or generated text. A metric is never replaced by another."""
import mindspore as ms
from mindspore import nn, ops

from mindformers.core.context import sum_over_ranks
from mindformers.core.metric import PerplexityMetric, merge_rank_sums, metric_inputs
from mindformers.tools.build import build_metric
from mindformers.trainer.utils import column_arguments

__all__ = ['resolve_metric', 'evaluate', 'generation_options', 'describe']


def resolve_metric(compute_metrics, config):
    """The metric to evaluate with: `compute_metrics` given to the Trainer (a metric, or a dict or list holding one),
    else the one the run config's `metric` section names (a registered METRIC), else a PerplexityMetric. The metric
    must declare what it consumes (`metric_inputs`)."""
    metric, where = compute_metrics, 'compute_metrics'
    if isinstance(metric, dict):
        metric = list(metric.values())
    if isinstance(metric, (list, tuple, set)):
        if len(metric) != 1:
            raise ValueError(f"compute_metrics holds {len(metric)} metrics; evaluation computes one: pass one metric")
        metric = next(iter(metric))
    if metric is None:
        section = config.get('metric')
        if not section or not section.get('type'):
            return PerplexityMetric()
        metric, where = build_metric(dict(section), where='metric'), f"metric.type {section.get('type')}"
    metric_inputs(metric, where)
    return metric


class _EvalLossCell(nn.Cell):
    """`(loss_sum, token_count)` of next-token prediction on `input_ids [B, S+1]` (run with the model in eval mode)."""

    def __init__(self, network):
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, input_ids, attention_mask=None, labels=None):
        mean, count = self.network.next_token_loss(input_ids, attention_mask, labels)
        return mean * count, count


class _EvalLogitsCell(nn.Cell):
    """`(logits [B, S, V], labels [B, S], mask [B, S])` of next-token prediction on `input_ids [B, S+1]`: the logits
    and targets `next_token_loss` computes its loss from."""

    def __init__(self, network):
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, input_ids, attention_mask=None, labels=None):
        batch, seq = input_ids.shape[0], input_ids.shape[1] - 1
        targets, mask = self.network.loss_targets(input_ids, attention_mask, labels)
        logits = self.network.logits(input_ids[:, :-1]).reshape(batch, seq, -1)
        return ops.cast(logits, ms.float32), ops.cast(targets, ms.int32).reshape(batch, seq), mask.reshape(batch, seq)


def evaluate(network, metric, dataset, rank_id=0, stride=1, device_num=1, tokenizer=None, options=None):
    """`metric.eval()` over `dataset`, fed as `metric.consumes` declares; batches rank_id, rank_id + stride, ... of
    the dataset are this rank's. With `device_num > 1` the metric's `rank_sums` are added over the ranks, so every
    rank returns the global result. Adds 'tokens' (loss and logits metrics with a `total_tokens` count) or
    'samples' (text metrics with a `count`). Text metrics need `tokenizer` and generate with `options`
    (`generation_options`)."""
    consumes = metric_inputs(metric)
    network.set_train(False)
    metric.clear()
    if consumes == 'text':
        _feed_text(network, metric, dataset, rank_id, stride, tokenizer, options or {})
    else:
        _feed_tensors(network, metric, dataset, rank_id, stride, consumes)
    if device_num > 1:
        merge_rank_sums(metric, sum_over_ranks)
    result = metric.eval()
    key, counter = ('samples', 'count') if consumes == 'text' else ('tokens', 'total_tokens')
    if hasattr(metric, counter):
        result[key] = int(getattr(metric, counter))
    return result


def _own_batches(iterator, rank_id, stride):
    for index, batch in enumerate(iterator):
        if index % stride == rank_id % stride:
            yield batch


def eval_cell(network, consumes):
    """The `_EvalLossCell` ('loss') or `_EvalLogitsCell` ('logits') over `network`, kept (in the network's
    `_eval_cells`, as `session_for` keeps generate()'s sessions) so every evaluation of the network, e.g. each one
    during training, reuses its compiled graph instead of compiling a new cell's."""
    cells = network.__dict__.setdefault('_eval_cells', {})
    if consumes not in cells:
        cells[consumes] = _EvalLossCell(network) if consumes == 'loss' else _EvalLogitsCell(network)
    return cells[consumes]


def _feed_tensors(network, metric, dataset, rank_id, stride, consumes):
    """update(loss_sum, token_count) or update(logits, labels, mask) per batch."""
    cell = eval_cell(network, consumes)
    arg_columns = column_arguments(cell, dataset.get_col_names()) or [0]
    for batch in _own_batches(dataset.create_tuple_iterator(num_epochs=1, output_numpy=False), rank_id, stride):
        batch = [t if t.dtype == ms.int32 else t.astype(ms.int32) for t in batch]
        outputs = cell(*[None if i is None else batch[i] for i in arg_columns])
        if consumes == 'loss':
            metric.update(*(float(out.asnumpy()) for out in outputs))
        else:
            metric.update(*(out.asnumpy() for out in outputs))


def generation_options(config, generate_kwargs):
    """generate() options for text metrics: greedy, then the run config's `generation` section, then
    `generate_kwargs`; max_new_tokens defaults to the eval dataset's max_target_length."""
    options = {'do_sample': False, **dict(config.get('generation') or {}), **generate_kwargs}
    eval_config = config.get('eval_dataset') or (config.get('eval_dataset_task') or {}).get('dataset_config') or {}
    max_target = eval_config.get('max_target_length') or (eval_config.get('data_loader') or {}).get(
        'max_target_length')
    if max_target and 'max_new_tokens' not in options and 'max_length' not in options:
        options['max_new_tokens'] = int(max_target)
    return options


def _feed_text(network, metric, dataset, rank_id, stride, tokenizer, options):
    """update(predictions, references): each batch's `input_ids` (left-padded prompts) are continued with
    `network.generate(**options)`, the prompts cut off, and the continuations and `labels` (reference ids, -100
    after them) decoded without special tokens."""
    missing = [c for c in ('input_ids', 'labels') if c not in dataset.get_col_names()]
    if missing:
        raise ValueError(f"metric {type(metric).__name__} generates from the eval data's input_ids and scores "
                         f"against its labels, but the eval dataset has no {missing} (columns: "
                         f"{dataset.get_col_names()}); use e.g. KeyWordGenDataset with phase: eval")
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    for batch in _own_batches(dataset.create_dict_iterator(num_epochs=1, output_numpy=True), rank_id, stride):
        prompts = [_without_left_padding(row, pad) for row in batch['input_ids']]
        outputs = network.generate(prompts, **options)
        preds = [tokenizer.decode(out[len(prompt):], skip_special_tokens=True) for prompt, out in zip(prompts, outputs)]
        refs = [tokenizer.decode(row[row >= 0], skip_special_tokens=True) for row in batch['labels']]
        metric.update(preds, refs)


def _without_left_padding(row, pad):
    """The ids of a left-padded prompt row without its leading `pad` ids."""
    start = 0
    while start < len(row) and row[start] == pad:
        start += 1
    if start == len(row):
        raise ValueError("an eval sample's input_ids are all padding: there is no prompt to continue")
    return [int(i) for i in row[start:]]


def describe(result):
    """One log line for an evaluation result."""
    if 'PPL' in result and 'tokens' in result:
        return f"loss {result['loss']:.4f}, PPL {result['PPL']:.3f} over {result['tokens']} tokens"
    scores = ', '.join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                       for key, value in result.items() if key not in ('samples', 'tokens'))
    return scores + next((f" over {result[key]} {key}" for key in ('samples', 'tokens') if key in result), '')
