"""Parallel and recompute settings that every layer receives (MindFormers' `parallel_config` / `recompute_config`),
their validation against a job and a model, and the assignment of transformer layers to pipeline stages."""
import copy
from dataclasses import dataclass, field, fields, asdict

from mindformers.tools.register.config import unknown_key_message

__all__ = ['ParallelConfig', 'RecomputeConfig', 'build_parallel_config', 'check_unsupported', 'stage_layer_counts',
           'layer_stages', 'default_parallel_config']


@dataclass
class RecomputeConfig:
    """Activation recomputation. `recompute` may be a bool (all layers) or a per-stage list of layer counts."""
    recompute: object = False
    select_recompute: bool = False
    parallel_optimizer_comm_recompute: bool = False
    mp_comm_recompute: bool = True
    recompute_slice_activation: bool = False


@dataclass
class ParallelConfig:
    """Degrees of parallelism (dp x mp x pp devices) and related switches.

    Layers read `data_parallel` and `model_parallel` to declare shard strategies; on one device all are 1 and the
    strategies are no-ops."""
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    micro_batch_num: int = 1
    micro_batch_interleave_num: int = 1
    optimizer_shard: bool = False
    vocab_emb_dp: bool = True
    use_seq_parallel: bool = False
    gradient_aggregation_group: int = 4
    expert_parallel: int = 1
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)

    def to_dict(self):
        return asdict(self)

    def validate(self, device_num, model_config=None, global_batch_size=None):
        """Raise ValueError (one message naming the key and the numbers) unless this layout fits the job.

        `device_num`: the devices of the job (the process group size under `use_parallel`, else 1); it must equal
        data_parallel x model_parallel x pipeline_stage, and micro_batch_num must be at least pipeline_stage.
        `model_config` (optional): its family checks run with this parallel config (`validate()`: heads, key/value
        heads and, unless vocab_emb_dp, the vocabulary divisible by model_parallel), and its layers must fill every
        pipeline stage (`num_layers` >= pipeline_stage, `offset` see `stage_layer_counts`).
        `global_batch_size` (optional): the samples one step feeds all data-parallel ranks together; it must split
        into data_parallel (x micro_batch_num under pipeline parallel) equal parts. MindFormers' (and our)
        `runner_config.batch_size` is per data-parallel rank, so a batch derived from it always does."""
        for name in ('data_parallel', 'model_parallel', 'pipeline_stage', 'micro_batch_num',
                     'micro_batch_interleave_num'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel_config.{name} must be a positive integer, got {value!r}")
        dp, mp, pp = self.data_parallel, self.model_parallel, self.pipeline_stage
        if dp * mp * pp != device_num:
            raise ValueError(f"parallel_config: data_parallel ({dp}) x model_parallel ({mp}) x pipeline_stage ({pp}) "
                             f"= {dp * mp * pp} devices, but the job has {device_num} (the process group size "
                             f"under use_parallel, else 1); make the product equal {device_num}")
        if self.micro_batch_num < pp:
            raise ValueError(f"parallel_config.micro_batch_num ({self.micro_batch_num}) must be at least "
                             f"parallel_config.pipeline_stage ({pp}) to keep every stage busy")
        if model_config is not None:
            checked = copy.copy(model_config)
            checked.parallel_config = self
            if hasattr(checked, 'validate'):
                checked.validate()
            stage_layer_counts(model_config.num_layers, pp, getattr(model_config, 'offset', 0))
        if global_batch_size is not None:
            parts = dp * (self.micro_batch_num if pp > 1 else 1)
            if global_batch_size % parts:
                what = (f"data_parallel ({dp}) x micro_batch_num ({self.micro_batch_num}) = {parts}" if pp > 1
                        else f"parallel_config.data_parallel ({dp})")
                raise ValueError(f"the global batch ({global_batch_size} samples) must be divisible by {what}")
        return self


# MindFormers switches accepted with their default only: (default, what to do instead)
_UNSUPPORTED = {
    'parallel_config': {
        'use_seq_parallel': (False, 'sequence parallelism is not implemented'),
        'expert_parallel': (1, 'there are no mixture-of-experts layers'),
        'gradient_aggregation_group': (4, 'gradient aggregation groups are not implemented'),
        'micro_batch_interleave_num': (1, 'micro-batch interleaving is not implemented'),
    },
    'recompute_config': {
        'select_recompute': (False, 'only whole-layer recomputation (recompute) is implemented'),
        'parallel_optimizer_comm_recompute': (False, 'only whole-layer recomputation (recompute) is implemented'),
        'mp_comm_recompute': (True, 'only whole-layer recomputation (recompute) is implemented'),
        'recompute_slice_activation': (False, 'only whole-layer recomputation (recompute) is implemented'),
    },
}


def check_unsupported(values, where):
    """Raise ValueError when `values` (a mapping) sets a switch of `_UNSUPPORTED[where]` to other than its default."""
    for name, (default, why) in _UNSUPPORTED[where].items():
        value = values.get(name, default)
        if value != default or isinstance(value, bool) != isinstance(default, bool):
            raise ValueError(f"{where}.{name}={value!r} is not supported ({why}); remove it or set "
                             f"{name}: {default}")


def _from_mapping(cls, mapping, where):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ValueError('; '.join(unknown_key_message(f"{where}.{key}", known) for key in unknown))
    check_unsupported(mapping, where)
    return cls(**{k: v for k, v in mapping.items()})


def build_parallel_config(parallel_config=None, recompute_config=None):
    """Turn YAML mappings (or existing objects) into a ParallelConfig with its RecomputeConfig."""
    if isinstance(parallel_config, ParallelConfig):
        result = parallel_config
        check_unsupported(asdict(result), 'parallel_config')
        check_unsupported(asdict(result.recompute), 'recompute_config')
    elif not isinstance(parallel_config, (dict, type(None))):
        raise ValueError(f"parallel_config must be a mapping (data_parallel, model_parallel, ...), "
                         f"got {parallel_config!r}")
    else:
        mapping = dict(parallel_config or {})
        mapping.pop('recompute', None)
        result = _from_mapping(ParallelConfig, mapping, 'parallel_config')
    if recompute_config is not None:
        if isinstance(recompute_config, RecomputeConfig):
            check_unsupported(asdict(recompute_config), 'recompute_config')
            result.recompute = recompute_config
        elif isinstance(recompute_config, bool):
            result.recompute = RecomputeConfig(recompute=recompute_config)
        elif not isinstance(recompute_config, dict):
            raise ValueError(f"recompute_config must be a mapping (recompute: ...) or a bool, "
                             f"got {recompute_config!r}")
        else:
            result.recompute = _from_mapping(RecomputeConfig, dict(recompute_config), 'recompute_config')
    if result.pipeline_stage > 1:
        result.vocab_emb_dp = False
    return result


def stage_layer_counts(num_layers, pipeline_stage, offset=0):
    """How many of `num_layers` consecutive transformer layers each of the `pipeline_stage` stages holds.

    By default an even split (stage s holds the layers i with i * stages // num_layers == s: earlier stages take the
    remainder). `offset` is MindFormers' `model_config.offset`: a list with one entry per stage adds offset[s]
    layers to stage s (the entries must sum to 0); an int k moves k layers from the first stage to the last (k < 0
    the other way). Raises ValueError naming the numbers when a stage would hold no layer."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"model_config.num_layers must be a positive integer, got {num_layers!r}")
    if num_layers < pipeline_stage:
        raise ValueError(f"model_config.num_layers ({num_layers}) must be at least parallel_config.pipeline_stage "
                         f"({pipeline_stage}): every pipeline stage needs a layer")
    even = [0] * pipeline_stage
    for layer in range(num_layers):
        even[layer * pipeline_stage // num_layers] += 1
    if isinstance(offset, bool) or not isinstance(offset, (int, list, tuple)):
        raise ValueError(f"model_config.offset must be an int or a list of ints (one per pipeline stage), "
                         f"got {offset!r}")
    if isinstance(offset, int):
        shift = [0] * pipeline_stage
        shift[0] -= offset
        shift[-1] += offset
    else:
        shift = list(offset)
        if len(shift) != pipeline_stage or any(isinstance(v, bool) or not isinstance(v, int) for v in shift):
            raise ValueError(f"model_config.offset {shift} must hold one int per pipeline stage "
                             f"(parallel_config.pipeline_stage is {pipeline_stage})")
        if sum(shift):
            raise ValueError(f"model_config.offset {shift} must sum to 0 (it moves layers between stages), "
                             f"but sums to {sum(shift)}")
    counts = [base + extra for base, extra in zip(even, shift)]
    for stage, count in enumerate(counts):
        if count < 1:
            raise ValueError(f"model_config.offset {offset!r} leaves pipeline stage {stage} with {count} layers "
                             f"(the even split of {num_layers} layers over {pipeline_stage} stages is {even}); "
                             f"every stage needs at least one layer")
    return counts


def layer_stages(num_layers, pipeline_stage, offset=0):
    """The pipeline stage of each of `num_layers` consecutive layers (see `stage_layer_counts`)."""
    counts = stage_layer_counts(num_layers, pipeline_stage, offset)
    return [stage for stage, count in enumerate(counts) for _ in range(count)]


default_parallel_config = ParallelConfig()
