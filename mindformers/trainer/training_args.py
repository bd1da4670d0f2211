"""TrainingArguments: the MindFormers r1.0 training fields; every value that is not None overrides the YAML."""
from dataclasses import dataclass, fields

from mindformers.tools.register import MindFormerConfig

_SCHEDULER_TYPES = ('linear', 'cosine', 'cosine_with_restarts', 'polynomial', 'constant_with_warmup')
_SAVE_STRATEGIES = ('no', 'steps')


@dataclass
class TrainingArguments:
    """Training options (all default None = keep the YAML's value, except `warmup_steps`).

    Mapping onto the YAML: output_dir, overwrite_output_dir, seed, use_parallel → top level; data_seed → train_dataset.seed;
    batch_size / per_device_train_batch_size → runner_config.batch_size and train_dataset.batch_size;
    per_device_eval_batch_size → eval_dataset.batch_size; num_train_epochs → runner_config.epochs;
    gradient_accumulation_steps → runner_config.gradient_accumulation_steps; optim, learning_rate, weight_decay,
    adam_beta1/2, adam_epsilon → optimizer.*; max_grad_norm → runner_wrapper.max_grad_norm; lr_scheduler_type,
    warmup_steps, warmup_ratio → lr_schedule.*; save_strategy 'no' drops the checkpoint callback; save_steps →
    save_checkpoint_steps; save_total_limit → keep_checkpoint_max; resume_from_checkpoint → load_checkpoint;
    auto_trans_ckpt, src_strategy_path_or_dir, do_eval, eval_step_interval, eval_epoch_interval → top level;
    logging_steps → MFLossMonitor.per_print_times."""
    output_dir: str = None
    overwrite_output_dir: bool = None
    use_parallel: bool = None
    seed: int = None
    data_seed: int = None
    batch_size: int = None
    per_device_train_batch_size: int = None
    per_device_eval_batch_size: int = None
    gradient_accumulation_steps: int = None
    num_train_epochs: int = None
    optim: str = None
    learning_rate: float = None
    weight_decay: float = None
    adam_beta1: float = None
    adam_beta2: float = None
    adam_epsilon: float = None
    max_grad_norm: float = None
    lr_scheduler_type: str = None
    warmup_steps: int = 0
    warmup_ratio: float = None
    save_strategy: str = None
    save_steps: int = None
    save_total_limit: int = None
    resume_from_checkpoint: str = None
    resume_training: bool = None
    auto_trans_ckpt: bool = None
    src_strategy_path_or_dir: str = None
    do_eval: bool = None
    eval_step_interval: int = None
    eval_epoch_interval: int = None
    logging_steps: int = None
    sink_mode: bool = None
    sink_size: int = None

    def __post_init__(self):
        if self.lr_scheduler_type is not None and self.lr_scheduler_type not in _SCHEDULER_TYPES:
            raise ValueError(f"TrainingArguments.lr_scheduler_type must be one of {', '.join(_SCHEDULER_TYPES)}, "
                             f"got {self.lr_scheduler_type!r}")
        if self.save_strategy is not None and self.save_strategy not in _SAVE_STRATEGIES:
            raise ValueError(f"TrainingArguments.save_strategy must be one of {', '.join(_SAVE_STRATEGIES)}, "
                             f"got {self.save_strategy!r}")
        for name in ('batch_size', 'per_device_train_batch_size', 'per_device_eval_batch_size',
                     'gradient_accumulation_steps', 'num_train_epochs', 'save_steps', 'logging_steps'):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"TrainingArguments.{name} must be a positive integer, got {value!r}")

    def apply_to(self, config: MindFormerConfig):
        """Write every set field into `config` (a full run config) and return it."""
        set_fields = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        put = config.merge_from_dict
        for key in ('output_dir', 'overwrite_output_dir', 'seed', 'use_parallel', 'do_eval', 'eval_step_interval', 'eval_epoch_interval',
                    'resume_training', 'auto_trans_ckpt', 'src_strategy_path_or_dir'):
            if key in set_fields:
                put({key: set_fields[key]})
        if 'data_seed' in set_fields:
            put({'train_dataset.seed': set_fields['data_seed']})
        batch = set_fields.get('per_device_train_batch_size', set_fields.get('batch_size'))
        if batch is not None:
            put({'runner_config.batch_size': batch, 'train_dataset.batch_size': batch})
        if 'per_device_eval_batch_size' in set_fields:
            put({'eval_dataset.batch_size': set_fields['per_device_eval_batch_size']})
        if 'num_train_epochs' in set_fields:
            put({'runner_config.epochs': set_fields['num_train_epochs']})
        if 'gradient_accumulation_steps' in set_fields:
            put({'runner_config.gradient_accumulation_steps': set_fields['gradient_accumulation_steps']})
        for src, dst in (('sink_mode', 'sink_mode'), ('sink_size', 'sink_size')):
            if src in set_fields:
                put({f'runner_config.{dst}': set_fields[src]})
        for src, dst in (('optim', 'type'), ('learning_rate', 'learning_rate'), ('weight_decay', 'weight_decay'),
                         ('adam_beta1', 'beta1'), ('adam_beta2', 'beta2'), ('adam_epsilon', 'eps')):
            if src in set_fields:
                put({f'optimizer.{dst}': set_fields[src]})
        if 'learning_rate' in set_fields:
            put({'lr_schedule.learning_rate': set_fields['learning_rate']})
        if 'lr_scheduler_type' in set_fields:
            put({'lr_schedule.type': set_fields['lr_scheduler_type']})
        if self.warmup_ratio is not None:
            put({'lr_schedule.warmup_ratio': self.warmup_ratio, 'lr_schedule.warmup_steps': None})
        elif self.warmup_steps:
            put({'lr_schedule.warmup_steps': self.warmup_steps})
        if 'max_grad_norm' in set_fields:
            put({'runner_wrapper.max_grad_norm': set_fields['max_grad_norm']})
        if 'resume_from_checkpoint' in set_fields:
            put({'load_checkpoint': set_fields['resume_from_checkpoint']})
        callbacks = [dict(cb) for cb in config.get('callbacks') or []]
        if set_fields.get('save_strategy') == 'no':
            callbacks = [cb for cb in callbacks if cb.get('type') not in ('CheckpointMonitor', 'CheckpointMointor')]
        for cb in callbacks:
            if cb.get('type') in ('CheckpointMonitor', 'CheckpointMointor'):
                if 'save_steps' in set_fields:
                    cb['save_checkpoint_steps'] = set_fields['save_steps']
                if 'save_total_limit' in set_fields:
                    cb['keep_checkpoint_max'] = set_fields['save_total_limit']
            if cb.get('type') == 'MFLossMonitor' and 'logging_steps' in set_fields:
                cb['per_print_times'] = set_fields['logging_steps']
        config['callbacks'] = callbacks
        return config
