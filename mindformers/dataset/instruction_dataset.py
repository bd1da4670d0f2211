"""InstructionDataset: prompt-masked (input_ids, labels) samples for supervised finetuning."""
from mindformers.dataset.causal_language_model_dataset import CausalLanguageModelDataset, check_dataset_columns
from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

COLUMNS = ('input_ids', 'labels')


@MindFormerRegister.register(MindFormerModuleType.DATASET)
class InstructionDataset(CausalLanguageModelDataset):
    """Batches of the samples `instruction_to_mindrecord` writes: int32 `input_ids` and `labels`, each
    [batch_size, seq_length + 1], labels -100 on prompts and padding (the model shifts them like input_ids).

    `dataset_config` takes the keys of `CausalLanguageModelDataset` (data_loader: {type: MindDataset, dataset_dir |
    dataset_files, shuffle} or a registered loader, batch_size, drop_remainder, repeat, num_parallel_workers, seed,
    rank_id / device_num, seq_length, start_epoch: same sampler, sharding and checks) but no eod_reset /
    output_columns; `input_columns` defaults to [input_ids, labels] and must name labels. The Trainer feeds the
    columns to `construct(input_ids, attention_mask=None, labels=None)` by name.
    """
    KNOWN_KEYS = CausalLanguageModelDataset.KNOWN_KEYS - {'eod_reset', 'output_columns'}
    DATA_HINT = "write instruction data with python -m mindformers.tools.dataset_preprocess.instruction_to_mindrecord"

    def __new__(cls, dataset_config=None):
        config = dict(dataset_config or {})
        cls._check_keys(config)
        columns = list(config.get('input_columns') or COLUMNS)
        if 'labels' not in columns:
            raise ValueError(f"{cls.__name__}: input_columns {columns} must include 'labels' (without them "
                             f"every token is trained: use CausalLanguageModelDataset for such data)")
        batch_size, workers = (cls._positive_int(config, key) for key in ('batch_size', 'num_parallel_workers'))
        dataset, where, files = cls._build_loader(config, workers)
        try:
            lengths = check_dataset_columns(dataset, columns, config.get('seq_length'), where=where)
        except ValueError as err:
            raise ValueError(f"{err} ({cls.DATA_HINT})") from None
        if lengths['labels'] != lengths[columns[0]]:
            raise ValueError(f"{where}: column 'labels' holds {lengths['labels']} entries per sample, "
                             f"{columns[0]!r} {lengths[columns[0]]}: they must match")
        samples = dataset.get_dataset_size()
        dataset = cls._batched(dataset.project(columns), config, columns, lengths, where, files)
        logger.info("%s: %d instruction samples, batch_size %d -> %d batches per epoch", where, samples, batch_size,
                    dataset.get_dataset_size())
        return dataset
