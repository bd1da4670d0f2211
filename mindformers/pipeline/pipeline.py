"""pipeline(): a ready-to-call task pipeline from a registered model name, a directory, a YAML or a model object."""
import os

from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

BUILD_TIME = ('batch_size', 'use_past', 'seq_length')


def pipeline(task='text_generation', model=None, tokenizer=None, **kwargs):
    """Build the pipeline registered for `task`.

    `model`: a registered name (e.g. 'gpt2_tiny'), a directory from `save_pretrained` or HuggingFace, a run YAML,
    or a model instance. `tokenizer`: an instance; by default loaded like the model (name, directory or YAML).
    `batch_size`, `use_past` and `seq_length` configure the model when it is built (for an instance, `use_past` is
    set on its config and `seq_length` must match); every other keyword is a default generate option."""
    from mindformers.models.auto import AutoModel, AutoTokenizer
    if task is None or not MindFormerRegister.is_exist(MindFormerModuleType.PIPELINE, task):
        known = [n for n in MindFormerRegister.names(MindFormerModuleType.PIPELINE) if not n[0].isupper()]
        raise ValueError(f"unknown pipeline task {task!r} (known tasks: {', '.join(known)})")
    if model is None:
        raise ValueError("pipeline() needs model= (a registered name such as 'gpt2_tiny', a directory, a YAML "
                         "path or a model instance)")
    build = {k: kwargs.pop(k) for k in BUILD_TIME if k in kwargs}
    if isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        model = AutoModel.from_pretrained(source, **build)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        seq_length = build.get('seq_length')
        if seq_length is not None and int(seq_length) != int(model.config.seq_length):
            raise ValueError(f"pipeline(seq_length={seq_length}) does not match the given model's seq_length "
                             f"{model.config.seq_length}; build the model with that seq_length instead")
        if 'use_past' in build:
            model.config.use_past = bool(build['use_past'])
        if 'batch_size' in build:
            model.config.batch_size = int(build['batch_size'])
    model.set_train(False)
    pipeline_cls = MindFormerRegister.get_cls(MindFormerModuleType.PIPELINE, task)
    return pipeline_cls(model=model, tokenizer=tokenizer, **kwargs)
