"""BaseDataset: what every task dataset shares — config checks, data-parallel sharding and the seeded sampler."""
import difflib
import numbers

import numpy as np
import mindspore.dataset as ds


def sampler_seed(seed, sampler_pass=0):
    """The MindRecord sampler seed that starts at pass `sampler_pass` of a run seeded `seed`.

    MindRecord's shuffling sampler reshuffles on every pass over the data (every epoch, or every repeat) with its
    seed plus one, so pass `p` of a run is pass 0 of a dataset built with `sampler_seed(seed, p)`: the data order
    is a pure function of (seed, pass). The run seed is hashed first so that runs with neighbouring seeds do not
    see each other's orders one pass apart."""
    base = int(np.random.SeedSequence(int(seed)).generate_state(1)[0]) >> 2  # leaves room for passes below 2**32
    return base + int(sampler_pass)


def seeded_sampler(shuffle=True, seed=0, num_shards=1, shard_id=0, start_pass=0):
    """A `mindspore.dataset.DistributedSampler` whose order depends only on (seed, pass) and the shard.

    Shards partition each pass's (shuffled) order; when the sample count is not a multiple of `num_shards`, the
    last shards repeat a few samples so that every rank runs the same number of steps."""
    shuffle = shuffle if isinstance(shuffle, ds.Shuffle) else bool(shuffle)
    sampler = ds.DistributedSampler(num_shards=int(num_shards), shard_id=int(shard_id), shuffle=shuffle)
    sampler.seed = sampler_seed(seed, start_pass)
    return sampler


class BaseDataset:
    """Base of the task datasets. Subclasses return a `mindspore.dataset` object from `__new__(cls, dataset_config)`.

    Common `dataset_config` keys: `seed`, `rank_id`/`device_num` (the data-parallel shard of this process and the
    number of shards), `start_epoch` (begin with that epoch's order; see `sampler_seed`)."""
    KNOWN_KEYS = frozenset()
    # keys of MindFormers configs that do not change what this implementation produces
    IGNORED_KEYS = frozenset({'numa_enable', 'prefetch_size', 'auto_tune', 'filepath_prefix', 'autotune_per_step',
                              'profile'})

    def __init__(self, dataset_config=None):
        self.dataset_config = dataset_config

    @classmethod
    def _check_keys(cls, config):
        for key in config:
            if key in cls.KNOWN_KEYS or key in cls.IGNORED_KEYS:
                continue
            close = difflib.get_close_matches(str(key), sorted(cls.KNOWN_KEYS), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"{cls.__name__}: unknown dataset_config key {key!r}{hint} "
                             f"(known keys: {', '.join(sorted(cls.KNOWN_KEYS))})")

    @classmethod
    def _positive_int(cls, config, key, default=1):
        value = config.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{cls.__name__}: dataset_config.{key} must be an integer >= 1, got {value!r}")
        return int(value)

    @staticmethod
    def _shard_info(config):
        """(num_shards, shard_id) from `device_num` and `rank_id` (defaults 1 and 0)."""
        num_shards = int(1 if config.get('device_num') is None else config['device_num'])
        shard_id = int(config.get('rank_id') or 0)
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ValueError(f"dataset_config: rank_id {shard_id} must lie in [0, device_num={num_shards})")
        return num_shards, shard_id
