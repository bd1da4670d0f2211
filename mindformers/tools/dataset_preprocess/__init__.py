"""Dataset preprocessing: raw text to MindRecord (`python -m mindformers.tools.dataset_preprocess.text_to_mindrecord`).

The reusable core (`build_lm_samples`, `iter_documents`, `write_mindrecord`) lives in `text_to_mindrecord`; it is not
imported here so that running that module with `-m` does not import it twice.
"""
