"""ADGENMetric: ROUGE-1/2/L F-scores and BLEU-4 of generated texts against their references, as ChatGLM's ADGEN
evaluation (and MindFormers' ADGENMetric) computes them with `rouge_chinese` 1.0.3 and nltk; implemented here
(neither package is needed; both give the same numbers, checked to 1e-12 on a few hundred ADGEN-style pairs).

Per sample (prediction, reference), all scores ×100 and rounded to 4 decimals, then averaged over the samples:
  rouge-1 / rouge-2  both texts cut into words by jieba (whitespace dropped); unique n-grams of each (the
                     libraries' default "exclusive" counting), P = |H ∩ R| / |H|, R = |H ∩ R| / |R|,
                     F = 2PR / (P + R + 1e-8).
  rouge-l            the length of the longest common subsequence of the two word sequences, divided by the
                     number of prediction words (P) and reference words (R); F as above.
  bleu-4             sentence BLEU on characters (spaces included) against the one reference: clipped n-gram
                     precisions for n = 1..4 with weights 1/4, NIST geometric smoothing of zero counts (nltk's
                     SmoothingFunction().method3: the k-th zero precision becomes 1 / (2^k * hypothesis n-grams)),
                     brevity penalty exp(1 - |ref| / |hyp|) when the prediction is not longer; 0 when no character
                     matches.
A prediction or reference without words scores 0 on the three ROUGE scores.
"""
import collections
import logging
import math

from mindspore.train import Metric

from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

__all__ = ['ADGENMetric', 'rouge_scores', 'sentence_bleu4']

EPSILON = 1e-8


def _segment(text):
    """jieba's words of `text`, whitespace dropped."""
    import jieba
    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading messages
    return ' '.join(jieba.cut(text)).split()


def _f_score(overlap, hyp_count, ref_count):
    precision = overlap / hyp_count if hyp_count else 0.0
    recall = overlap / ref_count if ref_count else 0.0
    return 2.0 * precision * recall / (precision + recall + EPSILON)


def _ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _lcs_length(first, second):
    """Length of the longest common subsequence of two sequences (dynamic programming, one row at a time)."""
    previous = [0] * (len(second) + 1)
    for item in first:
        current = [0]
        for j, other in enumerate(second):
            current.append(previous[j] + 1 if item == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_scores(prediction, reference):
    """{'rouge-1', 'rouge-2', 'rouge-l'}: F-scores in [0, 1] of one prediction against one reference (strings)."""
    hyp, ref = _segment(prediction), _segment(reference)
    if not hyp or not ref:
        return {'rouge-1': 0.0, 'rouge-2': 0.0, 'rouge-l': 0.0}
    scores = {}
    for n in (1, 2):
        hyp_grams, ref_grams = set(_ngrams(hyp, n)), set(_ngrams(ref, n))
        scores[f'rouge-{n}'] = _f_score(len(hyp_grams & ref_grams), len(hyp_grams), len(ref_grams))
    scores['rouge-l'] = _f_score(_lcs_length(hyp, ref), len(hyp), len(ref))
    return scores


def sentence_bleu4(prediction, reference):
    """Character-level BLEU-4 in [0, 1] of one prediction against one reference, smoothed with NIST's geometric
    sequence (nltk `sentence_bleu([list(reference)], list(prediction), smoothing_function=method3)`)."""
    hyp, ref = list(prediction), list(reference)
    log_sum, zeros = 0.0, 0
    for n in range(1, 5):
        hyp_counts, ref_counts = collections.Counter(_ngrams(hyp, n)), collections.Counter(_ngrams(ref, n))
        matched = sum(min(count, ref_counts[gram]) for gram, count in hyp_counts.items())
        total = max(1, sum(hyp_counts.values()))
        if n == 1 and matched == 0:
            return 0.0
        if matched == 0:
            zeros += 1
            precision = 1.0 / (2 ** zeros * total)
        else:
            precision = matched / total
        log_sum += 0.25 * math.log(precision)
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1.0 - len(ref) / len(hyp))
    return brevity * math.exp(log_sum)


@MindFormerRegister.register(MindFormerModuleType.METRIC)
class ADGENMetric(Metric):
    """Mean ROUGE-1/2/L and BLEU-4 (×100) of generated texts against references (see the module docstring).

    `update(preds, labels)`: decoded predictions and references, two lists of str of the same length (or two str).
    `eval()` returns `{'rouge-1', 'rouge-2', 'rouge-l', 'bleu-4'}` averaged over every sample since `clear()`.
    `totals` (per-key sums) and `count` are the running state, added up across data-parallel ranks. Evaluation
    generates text for it (`core.metric.contract`)."""
    KEYS = ('rouge-1', 'rouge-2', 'rouge-l', 'bleu-4')
    consumes = 'text'
    rank_sums = ('totals', 'count')

    def __init__(self):
        super().__init__()
        self.clear()

    def clear(self):
        self.totals = dict.fromkeys(self.KEYS, 0.0)
        self.count = 0

    def update(self, *inputs):
        if len(inputs) != 2:
            raise ValueError(f"ADGENMetric.update takes (preds, labels), got {len(inputs)} inputs")
        preds, labels = ([x] if isinstance(x, str) else list(x) for x in inputs)
        if len(preds) != len(labels):
            raise ValueError(f"ADGENMetric.update: {len(preds)} predictions but {len(labels)} references")
        for index, (pred, label) in enumerate(zip(preds, labels)):
            if not isinstance(pred, str) or not isinstance(label, str):
                raise TypeError(f"ADGENMetric.update: sample {index} is ({type(pred).__name__}, "
                                f"{type(label).__name__}); decode predictions and references to str first")
            scores = rouge_scores(pred, label)
            scores['bleu-4'] = sentence_bleu4(pred, label)
            for key in self.KEYS:
                self.totals[key] += round(scores[key] * 100, 4)
            self.count += 1

    def eval(self):
        if not self.count:
            raise RuntimeError("ADGENMetric.eval: no samples were scored; call update(preds, labels) first")
        return {key: self.totals[key] / self.count for key in self.KEYS}
