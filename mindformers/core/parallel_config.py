"""Parallel and recompute settings that every layer receives (MindFormers' `parallel_config` / `recompute_config`)."""
from dataclasses import dataclass, field, fields, asdict


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


def _from_mapping(cls, mapping, where):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (accepted: {', '.join(sorted(known))})")
    return cls(**{k: v for k, v in mapping.items()})


def build_parallel_config(parallel_config=None, recompute_config=None):
    """Turn YAML mappings (or existing objects) into a ParallelConfig with its RecomputeConfig."""
    if isinstance(parallel_config, ParallelConfig):
        result = parallel_config
    else:
        mapping = dict(parallel_config or {})
        mapping.pop('recompute', None)
        result = _from_mapping(ParallelConfig, mapping, 'parallel_config')
    if recompute_config is not None:
        if isinstance(recompute_config, RecomputeConfig):
            result.recompute = recompute_config
        elif isinstance(recompute_config, bool):
            result.recompute = RecomputeConfig(recompute=recompute_config)
        else:
            result.recompute = _from_mapping(RecomputeConfig, dict(recompute_config), 'recompute_config')
    if result.pipeline_stage > 1:
        result.vocab_emb_dp = False
    return result


default_parallel_config = ParallelConfig()
