"""Dataset preprocessing CLIs: `python -m mindformers.tools.dataset_preprocess.text_to_mindrecord` (raw text) and
`... .instruction_to_mindrecord` (instruction / conversation data) write MindRecord.

The library they run lives in `mindformers.dataset` (`preprocess`, `sft_preprocess`, `mindrecord_io`); nothing in
the package imports these modules, so running one with `-m` does not import it twice.
"""
