"""Training callbacks. They are MindSpore `Callback`s: the Trainer's loop calls `on_train_begin`,
`on_train_epoch_begin`, `on_train_step_end`, `on_train_epoch_end` and `on_train_end` with a `RunContext` whose
`original_args()` is a `TrainState`."""
import json
import math
import os
import time

from mindspore.train.callback import Callback

from mindformers.tools.checkpoint import save_checkpoint_atomic, record_checkpoint, remove_partial_files
from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

METRICS_FILE = 'metrics.jsonl'


class TrainState(dict):
    """What callbacks see of the run: a dict with attribute access (MindSpore's `RunContext` wants a dict, and its
    own callbacks read `cb_params.cur_step_num` and friends). Counters are 1-based once a step has run.

    Fields: cur_epoch_num, cur_step_num (global optimizer step), step_in_epoch, batch_num (steps per epoch),
    epoch_num, total_steps, loss (float), lr (float), grad_norm (float), tokens_per_step, train_network,
    network, optimizer, rank_id, output_dir, losses (every step's loss, in order), delta_info (None, or what a
    checkpoint of the trainable parameters alone records in meta.json: set by the Trainer for a model with frozen
    parameters, see `mindformers.trainer.delta.delta_info`)."""

    def __init__(self, **kwargs):
        super().__init__(cur_epoch_num=0, cur_step_num=0, step_in_epoch=0, loss=float('nan'), lr=float('nan'),
                         grad_norm=float('nan'), losses=[])
        self.update(kwargs)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"TrainState has no field {name!r}") from None

    def __setattr__(self, name, value):
        self[name] = value


def metrics_path(state):
    """`<output_dir>/log/rank_<i>/metrics.jsonl` of the run `state` describes."""
    return os.path.join(state.output_dir, 'log', f'rank_{state.rank_id}', METRICS_FILE)


def append_metrics(state, record):
    """Append one JSON object (a logged step or an evaluation) to the run's metrics.jsonl."""
    path = metrics_path(state)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record) + '\n')


def plot_loss_curve(metrics_file, png_path):
    """Draw loss (and eval loss) against step from metrics.jsonl into `png_path`; returns the path, or None when
    matplotlib is not installed. Steps logged twice (redone after a resume) keep their last value."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train, evals = {}, {}
    with open(metrics_file, encoding='utf-8') as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if 'loss' in record:
                train[record['step']] = record['loss']
            if 'eval_loss' in record:
                evals[record['step']] = record['eval_loss']
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(sorted(train), [train[k] for k in sorted(train)], label='train loss')
    if evals:
        axes.plot(sorted(evals), [evals[k] for k in sorted(evals)], 'o-', label='eval loss')
    axes.set_xlabel('step')
    axes.set_ylabel('loss')
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return png_path


def _format_seconds(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class MFLossMonitor(Callback):
    """Logs `step i/N, epoch e/E, loss, lr, grad_norm, tokens/s, ETA` every `per_print_times` steps (also appended
    as JSON to `<output_dir>/log/rank_<i>/metrics.jsonl`) and a summary (time, first and final loss, relative drop)
    at the end, with `loss_curve.png` beside the metrics when matplotlib is installed."""

    def __init__(self, per_print_times=1, learning_rate=None, micro_batch_num=1, micro_batch_interleave_num=1,
                 origin_epochs=None, dataset_size=None, initial_epoch=0, initial_step=0, global_batch_size=0,
                 gradient_accumulation_steps=1):
        """Only `per_print_times` matters; the other MindFormers arguments are accepted so existing YAMLs load, and
        their values are read from the live training state instead."""
        super().__init__()
        self.per_print_times = max(int(per_print_times), 1)
        self._start = None
        self._first_step_end = None
        self._window_start = None
        self._window_tokens = 0

    def on_train_begin(self, run_context):
        self._start = self._window_start = time.time()
        self._first_step_end = None
        self._window_tokens = 0

    def on_train_step_end(self, run_context):
        state = run_context.original_args()
        now = time.time()
        done = state.cur_step_num - state.initial_step
        if done == 1:
            self._first_step_end = now  # the first step includes compilation: leave it out of the ETA
        self._window_tokens += state.tokens_per_step
        if state.cur_step_num % self.per_print_times and state.cur_step_num != state.total_steps:
            return
        tokens_per_s = self._window_tokens / max(now - self._window_start, 1e-9)
        if done > 1:
            per_step = (now - self._first_step_end) / (done - 1)
        else:
            per_step = now - self._start
        eta = per_step * (state.total_steps - state.cur_step_num)
        state.tokens_per_s = tokens_per_s
        logger.info("step %d/%d, epoch %d/%d, loss %.4f, lr %.3e, grad_norm %.4f, %.0f tokens/s, ETA %s",
                    state.cur_step_num, state.total_steps, state.cur_epoch_num, state.epoch_num, state.loss,
                    state.lr, state.grad_norm, tokens_per_s, _format_seconds(eta))
        append_metrics(state, {'step': state.cur_step_num, 'epoch': state.cur_epoch_num, 'loss': state.loss,
                               'lr': state.lr, 'grad_norm': state.grad_norm, 'tokens_per_s': tokens_per_s,
                               'time': now})
        self._window_start, self._window_tokens = now, 0

    def on_train_end(self, run_context):
        state = run_context.original_args()
        losses = [x for x in state.losses if math.isfinite(x)]
        elapsed = time.time() - (self._start or time.time())
        if not losses:
            logger.info("training finished: no steps run")
            return
        tail = losses[-max(1, min(10, len(losses) // 5)):]
        final = sum(tail) / len(tail)
        drop = (losses[0] - final) / losses[0] * 100 if losses[0] else 0.0
        state.summary = {'steps': len(state.losses), 'seconds': elapsed, 'first_loss': losses[0],
                         'final_loss': final, 'loss_drop_percent': drop}
        logger.info("training finished: %d steps in %s (%.1f s); loss %.4f -> %.4f (mean of last %d steps), "
                    "%s by %.1f%%", len(state.losses), _format_seconds(elapsed), elapsed, losses[0], final,
                    len(tail), 'fell' if drop >= 0 else 'rose', abs(drop))
        metrics = metrics_path(state)
        if os.path.isfile(metrics):
            png = plot_loss_curve(metrics, os.path.join(os.path.dirname(metrics), 'loss_curve.png'))
            logger.info("metrics: %s%s", metrics, f"; loss curve: {png}" if png else
                        " (install matplotlib for a loss-curve PNG)")


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class CheckpointMonitor(Callback):
    """Saves the train network (model weights, optimizer state with its update count `global_step`, and the
    `epoch_num`/`step_num` counters) every `save_checkpoint_steps`
    optimizer steps and at the end, to `<directory or output_dir/checkpoint>/rank_<i>/<prefix>_rank_<i>-<epoch>_<step
    in epoch>.ckpt`, atomically, keeping at most `keep_checkpoint_max` files. `checkpoint_format`: 'ckpt' or
    'safetensors'.

    `save_trainable_params`: True saves only the trainable parameters of the network (with all the optimizer state
    and counters, which exist for those only): a delta checkpoint, loaded over the frozen base weights; its
    `meta.json` entry says so under `delta` (the run's `state.delta_info`: the PET config and the base weights it
    was trained on). False saves every parameter. None (default): delta checkpoints when the model has a PET delta
    (`state.delta_info['pet_config']` set by the Trainer), whole ones otherwise. (MindFormers' True writes a second,
    trainable-only file beside a whole checkpoint; here the one checkpoint is either.)"""

    def __init__(self, prefix='mindformers', directory=None, save_checkpoint_steps=1000, keep_checkpoint_max=5,
                 checkpoint_format='ckpt', integrated_save=True, save_network_params=False,
                 save_trainable_params=None, async_save=False):
        """`integrated_save`, `save_network_params` and `async_save` are MindFormers arguments accepted so existing
        YAMLs load: saves here are always integrated and synchronous, which is what makes them safe to resume
        from."""
        super().__init__()
        if checkpoint_format not in ('ckpt', 'safetensors'):
            raise ValueError(f"checkpoint_format must be 'ckpt' or 'safetensors', got {checkpoint_format!r}")
        if int(save_checkpoint_steps) < 1:
            raise ValueError(f"save_checkpoint_steps must be >= 1, got {save_checkpoint_steps}")
        if save_trainable_params not in (None, True, False):
            raise ValueError(f"save_trainable_params must be True, False or None (delta checkpoints for PET models), "
                             f"got {save_trainable_params!r}")
        self.prefix = prefix
        self.directory = directory
        self.save_checkpoint_steps = int(save_checkpoint_steps)
        self.keep_checkpoint_max = int(keep_checkpoint_max)
        self.checkpoint_format = checkpoint_format
        self.save_trainable_params = save_trainable_params
        self.last_saved_step = None
        self.last_path = None

    def _directory(self, state):
        return os.path.join(self.directory or os.path.join(state.output_dir, 'checkpoint'), f'rank_{state.rank_id}')

    def on_train_begin(self, run_context):
        remove_partial_files(self._directory(run_context.original_args()))

    def _save(self, state):
        if self.last_saved_step == state.cur_step_num:
            return
        directory = self._directory(state)
        name = f"{self.prefix}_rank_{state.rank_id}-{state.cur_epoch_num}_{state.step_in_epoch}." \
               f"{self.checkpoint_format}"
        path = os.path.join(directory, name)
        frozen = self._frozen(state)
        # gradient-accumulation buffers are zero at every step boundary: not state worth saving
        state_params = [p for p in state.train_network.get_parameters()
                        if not p.name.startswith('accu_grads.') and p.name not in frozen]
        save_checkpoint_atomic(state_params, path,
                               append_dict={'epoch_num': state.cur_epoch_num, 'step_num': state.step_in_epoch})
        delta = dict(state.get('delta_info') or {}) if frozen else None
        record_checkpoint(directory, name, state.cur_epoch_num, state.step_in_epoch, state.cur_step_num,
                          self.keep_checkpoint_max, run=state.get('run_shape'), delta=delta)
        self.last_saved_step, self.last_path = state.cur_step_num, path
        state.last_checkpoint = path
        logger.info("saved %scheckpoint %s", f"delta ({len(state_params)} tensors) " if frozen else '', path)

    def _frozen(self, state):
        """The names of the frozen network parameters this save leaves out (none for a whole checkpoint)."""
        trainable_only = self.save_trainable_params
        if trainable_only is None:
            trainable_only = bool((state.get('delta_info') or {}).get('pet_config'))
        if not trainable_only or state.get('network') is None:
            return set()
        return {p.name for p in state.network.get_parameters() if not p.requires_grad}

    def on_train_step_end(self, run_context):
        state = run_context.original_args()
        if state.cur_step_num % self.save_checkpoint_steps == 0:
            self._save(state)

    def on_train_end(self, run_context):
        state = run_context.original_args()
        if state.cur_step_num > 0:
            self._save(state)


MindFormerRegister.register_cls(CheckpointMonitor, MindFormerModuleType.CALLBACK, alias='CheckpointMointor')
