"""AutoConfig, AutoModel, AutoTokenizer, AutoProcessor: objects from a registered model name, a run YAML, a directory
written by `save_pretrained`, or a HuggingFace model directory (of a model type a registered family reads, see
`FamilySpec.hf_model_types`; converted on load). Which model a config builds is its family's (`register_family`).

A registered name with published weights (`model_book.SOURCES`) is built from its run YAML with those weights:
downloaded into the cache (`tools.hub`), loaded through the HuggingFace-directory path once, and kept converted in
`$MINDFORMERS_CACHE/converted/` so later loads read our names directly. A name or YAML without weights is an error
that points at `AutoModel.from_config`: `from_pretrained` never hands out random weights.

The two kinds of directory are told apart by their `config.json`: ours names a registered config class under `type`
(see `BaseConfig.to_dict`), a HuggingFace one carries `model_type` and no `type`."""
import json
import os

from mindformers.models.base_processor import PROCESSOR_CONFIG_FILE, BaseProcessor
from mindformers.models.convert_utils import hf_conversion_module, hf_family
from mindformers.tools.weights import INDEX_SUFFIX, built_for_checkpoint
from mindformers.tools.build import build_model_config, build_model, build_processor, build_tokenizer
from mindformers.models import model_book
from mindformers.models.model_book import find_config
from mindformers.tools.register import FamilySpec, MindFormerConfig, MindFormerRegister, MindFormerModuleType
from mindformers.tools.register.family import (families, family_of_config, hf_model_types,
                                               register_family, shared_hf_model_types)

CONFIG_FILE = 'config.json'
WEIGHT_SUFFIXES = ('.safetensors', '.ckpt')


class NoWeightsError(ValueError):
    """`from_pretrained` of a registered name or run YAML that has no weights to load."""


def register_auto(config_name, model_name):
    """Tell AutoModel.from_config which registered model class a config class builds: the short form of
    `register_family(FamilySpec(name=config_name, config=config_name, model=model_name))`, kept for older code."""
    known = {(spec.class_name('config'), spec.class_name('model')) for spec in families().values()}
    if (config_name, model_name) not in known:
        register_family(FamilySpec(name=config_name, config=config_name, model=model_name))


def _source_kind(name_or_path, caller):
    """'dir', 'yaml' or 'name' for a `from_pretrained` argument; anything else is a clear error."""
    source = os.fspath(name_or_path) if isinstance(name_or_path, os.PathLike) else name_or_path
    if not isinstance(source, str) or not source:
        raise TypeError(f"{caller}.from_pretrained expects a registered model name, a directory or a YAML path, "
                        f"got {name_or_path!r}")
    if os.path.isdir(source):
        return 'dir'
    if source.endswith(('.yaml', '.yml')):
        return 'yaml'
    if os.path.exists(source) or os.sep in source or '/' in source:
        what = 'is a file, not a directory or a YAML file' if os.path.exists(source) else 'does not exist'
        raise ValueError(f"{caller}.from_pretrained({source!r}): the path {what} (expected a registered model "
                         f"name, a directory written by save_pretrained or HuggingFace, or a run YAML)")
    return 'name'


def _run_config(name_or_path):
    """The run config behind a registered name or a YAML path."""
    if str(name_or_path).endswith(('.yaml', '.yml')):
        return MindFormerConfig(os.fspath(name_or_path))
    return MindFormerConfig(find_config(name_or_path))


def _read_config_json(directory):
    """(mapping, 'ours' | 'hf') for `directory/config.json`, or an error naming the directory and what is wrong."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory} has no {CONFIG_FILE}: expected a directory written by save_pretrained or a "
                         f"HuggingFace model directory")
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    if 'type' in data:
        if not MindFormerRegister.is_exist(MindFormerModuleType.CONFIG, data['type']):
            MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, data['type'], where=f"{path}: type")
        return data, 'ours'
    if 'model_type' in data:
        return data, 'hf'
    raise ValueError(f"{path} has neither 'type' (a config saved by save_pretrained) nor 'model_type' (a "
                     f"HuggingFace config)")


def _check_overrides(config_type, kwargs, caller, source):
    """Refuse `kwargs` that are not fields of the config class `config_type` (a registered name or a class)."""
    from mindformers.tools.register.config import unknown_key_message
    config_cls = config_type if isinstance(config_type, type) else \
        MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, config_type)
    fields = config_cls.field_names()
    unknown = sorted(k for k in kwargs if k not in fields)
    if unknown:
        raise TypeError(f"{caller}.from_pretrained({os.fspath(source)!r}): " + '; '.join(
            unknown_key_message(key, fields, f'{config_cls.__name__} field') for key in unknown))


class AutoConfig:
    """`AutoConfig.from_pretrained(name | yaml | directory, **overrides)` -> the model config object."""

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        if _source_kind(name_or_path, cls.__name__) != 'dir':
            section = dict(_run_config(name_or_path).model.model_config)
            _check_overrides(section.get('type'), kwargs, cls.__name__, name_or_path)
            section.update(kwargs)
            return build_model_config(section)
        directory = os.fspath(name_or_path)
        data, kind = _read_config_json(directory)
        if kind == 'ours':
            _check_overrides(data['type'], kwargs, cls.__name__, name_or_path)
            return build_model_config({**data, **kwargs})
        config = hf_conversion_module(data, os.path.join(directory, CONFIG_FILE)).config_from_hf(data)
        _check_overrides(type(config), kwargs, cls.__name__, name_or_path)
        return type(config).from_dict({**config.to_dict(), **kwargs}) if kwargs else config


class AutoModel:
    """`AutoModel.from_pretrained(name | yaml | directory, **config_overrides)` and `AutoModel.from_config(config)`."""

    @classmethod
    def from_config(cls, config, **kwargs):
        """A model with fresh weights (or `config.checkpoint_name_or_path`'s) for `config` (a config object, or
        anything AutoConfig.from_pretrained takes plus overrides): the class registered for the config type, or
        for a registered name or run YAML the class its `model.arch` names."""
        if not hasattr(config, 'to_dict'):
            if _source_kind(config, cls.__name__) != 'dir':
                run_config = _run_config(config)
                _check_overrides(run_config.model.model_config.get('type'), kwargs, cls.__name__, config)
                run_config.model.model_config.merge_from_dict(kwargs)
                return _arch_class(run_config, None)(build_model_config(run_config.model.model_config))
            config = AutoConfig.from_pretrained(config, **kwargs)
        return _model_class(config)(config)

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        """A model with its weights: a registered name (its YAML; published weights fetched into the cache), a run
        YAML (its `checkpoint_name_or_path`), our directory (config.json + one .safetensors/.ckpt) or a HuggingFace
        directory (config.json + model.safetensors / pytorch_model.bin, converted). `kwargs` override config
        fields (e.g. seq_length, use_past)."""
        return load_model(name_or_path, None, **kwargs)


def _model_class(config):
    spec = family_of_config(type(config))
    if spec is None:
        known = sorted(spec.class_name('config') for spec in families().values())
        raise ValueError(f"no model class is known for {type(config).__name__}; known configs: {', '.join(known)} "
                         f"(a family declares its config and model with register_family)")
    return spec.get_class('model')


def load_model(name_or_path, model_class=None, **kwargs):
    """What AutoModel.from_pretrained does; `model_class` (e.g. from `GPT2LMHeadModel.from_pretrained`) replaces
    the class the source names."""
    caller = model_class.__name__ if model_class else 'AutoModel'
    kind = _source_kind(name_or_path, caller)
    if kind != 'dir':
        run_config = _run_config(name_or_path)
        if kwargs:
            _check_overrides(run_config.model.model_config.get('type'), kwargs, caller, name_or_path)
            run_config.model.model_config.merge_from_dict(kwargs)
        model_config = run_config.model.model_config
        if not model_config.get('checkpoint_name_or_path'):
            if kind == 'name' and model_book.source_for(name_or_path) is not None:
                return _load_published(name_or_path, run_config, model_class)
            if kind == 'name' and name_or_path in model_book.CHECKPOINTS:
                model_config.checkpoint_name_or_path = name_or_path  # fetched and loaded by load_checkpoint
            elif kind == 'name':
                raise NoWeightsError(f"{caller}.from_pretrained: {model_book.no_weights_message(name_or_path)}")
            else:
                raise NoWeightsError(f"{caller}.from_pretrained({os.fspath(name_or_path)!r}): the YAML sets no "
                                 f"model.model_config.checkpoint_name_or_path, so there are no weights to load; "
                                 f"for fresh weights use AutoModel.from_config(AutoConfig.from_pretrained(<yaml>))")
        if model_class is None:
            return built_for_checkpoint(lambda: build_model(run_config.model))
        return built_for_checkpoint(lambda: model_class(build_model_config(model_config)))
    directory = os.fspath(name_or_path)
    data, kind = _read_config_json(directory)
    config = AutoConfig.from_pretrained(directory, **kwargs)
    model_class = model_class or _model_class(config)
    if kind == 'hf':
        config.checkpoint_name_or_path = directory  # converted per tensor as the model loads it
    elif not config.checkpoint_name_or_path:
        config.checkpoint_name_or_path = _our_weights(directory)
    return built_for_checkpoint(lambda: model_class(config))


def _arch_class(run_config, model_class):
    """`model_class`, else the class a run config's `model.arch.type` names, else its config's family model."""
    arch = (run_config.model.get('arch') or {}).get('type')
    if model_class is None and arch:
        return MindFormerRegister.get_cls(MindFormerModuleType.MODELS, arch, where='model.arch.type')
    return model_class or _model_class(build_model_config(run_config.model.model_config))


def _converted_path(repo, model_class):
    """Where the published weights of `name` are kept converted: one file per repository commit and model class."""
    from mindformers.tools.utils import cache_dir
    return os.path.join(cache_dir('converted', repo.repo.replace('/', '--'), repo.commit),
                        f'{model_class.__name__}.safetensors')


def _load_published(name, run_config, model_class=None):
    """`name`'s run YAML built with its published weights (converted once, then read from the converted cache)."""
    from mindformers.tools.checkpoint import save_checkpoint_atomic
    source = model_book.source_for(name)
    model_class = _arch_class(run_config, model_class)
    model_config = run_config.model.model_config
    repo = source.hub_repo()
    repo.files()  # the commit the converted copy belongs to
    converted = _converted_path(repo, model_class)
    if not os.path.isfile(converted):
        if source.weights == 'mindspore':
            _convert_release(repo, model_config, converted)
        else:
            directory = os.path.dirname(repo.download(repo.weight_files())[0])
            # the cache keeps float weights: an int8 model is quantized from it below
            floating = ('type', 'checkpoint_name_or_path', 'quantization', 'quantization_config')
            overrides = {k: v for k, v in model_config.items() if k not in floating}
            model = load_model(directory, model_class, **overrides)
            delta = set(model.pet_parameter_names)
            save_checkpoint_atomic({p.name: p for p in model.get_parameters() if p.name not in delta}, converted)
            if not model_config.get('quantization'):
                return model
            del model
    model_config.checkpoint_name_or_path = converted
    return built_for_checkpoint(lambda: model_class(build_model_config(model_config)))


def _convert_release(repo, model_config, converted):
    """A MindSpore release (the repository's one .ckpt, in the family's release naming) converted to `converted`
    with the run YAML's architecture."""
    releases = sorted(f for f in repo.files() if f.endswith('.ckpt'))
    if len(releases) != 1:
        raise ValueError(f"{repo.repo} holds {len(releases)} .ckpt files ({', '.join(releases) or 'none'}); one "
                         f"merged checkpoint is expected: convert it with convert_weight.py and give the path")
    config = build_model_config({**model_config, 'checkpoint_name_or_path': ''})
    spec = family_of_config(type(config))
    spec.load_converter().convert_pt_to_ms(repo.download(releases)[0], converted, config=config)


def converted_checkpoint(name):
    """The converted checkpoint of `name`'s published weights (see model_book.checkpoint_for)."""
    run_config = _run_config(name)
    repo = model_book.source_for(name).hub_repo()
    repo.files()
    converted = _converted_path(repo, _arch_class(run_config, None))
    if not os.path.isfile(converted):
        _load_published(name, run_config)
    return converted


def _our_weights(directory):
    """The weights of a save_pretrained directory: its one weight file, or the index of its sharded set."""
    files = sorted(f for f in os.listdir(directory) if f.endswith(WEIGHT_SUFFIXES + (INDEX_SUFFIX,))
                   and not f.startswith('.'))
    indexes = [f for f in files if f.endswith(INDEX_SUFFIX)]
    weights = indexes if indexes else files
    if not weights:
        raise ValueError(f"{directory} has {CONFIG_FILE} but no weights (model.safetensors, "
                         f"model.safetensors.index.json or model.ckpt); for fresh weights use "
                         f"AutoModel.from_config(AutoConfig.from_pretrained({directory!r}))")
    if len(weights) > 1:
        raise ValueError(f"{directory} holds several weight {'indexes' if indexes else 'files'} "
                         f"({', '.join(weights)}); keep one")
    return os.path.join(directory, weights[0])


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(name | yaml | directory, **overrides)`; a directory holds our
    `tokenizer_config.json` (written by save_pretrained), or is a HuggingFace model directory whose config.json
    `model_type` has a converter (vocab.json + merges.txt or tokenizer.json for GPT-2), or holds just the vocabulary
    file of one tokenizer class (vocab.json + merges.txt: GPT2Tokenizer; ice_text.model: ChatGLMTokenizer;
    vocab.model: PanguAlphaTokenizer). A bare `tokenizer.model` fits several classes and is refused with their
    names."""

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        from mindformers.models.base_tokenizer import TOKENIZER_CONFIG_FILE
        if _source_kind(name_or_path, cls.__name__) != 'dir':
            section = {**_run_config(name_or_path).processor.tokenizer, **kwargs}
            return build_tokenizer(_published_vocabulary(name_or_path, section), where='processor.tokenizer')
        directory = os.fspath(name_or_path)
        class_name = None
        config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
        if os.path.isfile(config_path):
            with open(config_path, encoding='utf-8') as f:
                saved = json.load(f)
            class_name = saved.get('tokenizer_class')
            kwargs = {**_added_token_contents(saved), **kwargs}
        shared = _shared_hf_model_type(directory)
        if shared:  # e.g. ChatGLM-6B and ChatGLM2-6B both name their tokenizer 'ChatGLMTokenizer'
            class_name = hf_family(shared)[1]
        if class_name is None or not MindFormerRegister.is_exist(MindFormerModuleType.TOKENIZER, class_name):
            data = _read_config_json(directory)[0] if os.path.isfile(os.path.join(directory, CONFIG_FILE)) else {}
            found = hf_family(data)
            if found is not None:
                class_name = found[1]
            else:
                found = (f"tokenizer_class {class_name!r} in {TOKENIZER_CONFIG_FILE} is not a registered tokenizer"
                         if class_name else f"{TOKENIZER_CONFIG_FILE} names no tokenizer_class"
                         if os.path.isfile(config_path) else f"there is no {TOKENIZER_CONFIG_FILE}")
                unknown = (f"{directory}: cannot tell which tokenizer to load ({found}, and {CONFIG_FILE} names no "
                           f"supported HuggingFace model_type: {', '.join(hf_model_types())})")
                if class_name:
                    raise ValueError(unknown)
                class_name = _class_of_vocabulary(directory, unknown)
        tok_cls = MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, class_name)
        files = getattr(tok_cls, 'vocab_files_names', {}).values()
        if files and not any(os.path.isfile(os.path.join(directory, f)) for f in files):
            raise ValueError(f"{directory} has no {tok_cls.__name__} files (looked for {', '.join(files)})")
        return tok_cls.from_pretrained(directory, **kwargs)


def _published_vocabulary(name_or_path, section):
    """A registered name's tokenizer section with each empty vocabulary-file argument (e.g. `vocab_file: ''`) set to
    that file of its published source (`vocab_files_names`), downloaded into the cache."""
    source = model_book.source_for(name_or_path) if _source_kind(name_or_path, 'AutoTokenizer') == 'name' else None
    if source is None or not section.get('type'):
        return section
    tok_cls = MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, section['type'], where='processor.tokenizer')
    wanted = {key: file for key, file in getattr(tok_cls, 'vocab_files_names', {}).items()
              if key in section and not section[key]}
    if wanted:
        section.update(zip(wanted, source.hub_repo().download(list(wanted.values()))))
    return section


def _class_of_vocabulary(directory, unknown):
    """The one registered tokenizer class whose vocabulary file (`vocab_files_names['vocab_file']`) `directory`
    holds; else ValueError `unknown`, naming the classes when the file fits several."""
    fitting = {}
    for name in MindFormerRegister.names(MindFormerModuleType.TOKENIZER):
        tok_cls = MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, name)
        vocab = getattr(tok_cls, 'vocab_files_names', {}).get('vocab_file')
        if vocab and os.path.isfile(os.path.join(directory, vocab)):
            fitting.setdefault(vocab, set()).add(tok_cls.__name__)
    classes = sorted(set().union(*fitting.values()))
    if len(classes) == 1:
        return classes[0]
    if classes:
        files = ', '.join(sorted(fitting))
        unknown += (f"; {files} fits {', '.join(classes)}: load it with the right class (e.g. "
                    f"{classes[0]}.from_pretrained({directory!r})) or write "
                    f'{{"tokenizer_class": "<class>"}} to tokenizer_config.json there')
    raise ValueError(unknown)


def _shared_hf_model_type(directory):
    """The config.json mapping of a HuggingFace directory whose model_type several families read (told apart by
    `FamilySpec.hf_match`), else None."""
    try:
        with open(os.path.join(directory, CONFIG_FILE), encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and 'type' not in data and data.get('model_type') in shared_hf_model_types():
        return data
    return None


def _added_token_contents(saved):
    """Special tokens that older HuggingFace tokenizer_config.json files (e.g. LLaMA-2's) store as AddedToken
    objects ({"__type": "AddedToken", "content": "<s>", ...}), as their strings."""
    return {key: value['content'] for key, value in saved.items()
            if key in ('unk_token', 'bos_token', 'eos_token', 'pad_token') and isinstance(value, dict)
            and isinstance(value.get('content'), str)}


class AutoProcessor:
    """`AutoProcessor.from_pretrained(name | yaml | directory, **overrides)`: the processor (tokenizer + input
    settings). A directory without `processor_config.json` gives a BaseProcessor around its tokenizer."""

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        if _source_kind(name_or_path, cls.__name__) != 'dir':
            section = dict(_run_config(name_or_path).processor)
            if section.get('tokenizer'):
                section['tokenizer'] = _published_vocabulary(name_or_path, dict(section['tokenizer']))
            section.update(kwargs)
            section.setdefault('type', 'BaseProcessor')
            return build_processor(section, where='processor')
        path = os.path.join(name_or_path, PROCESSOR_CONFIG_FILE)
        if not os.path.isfile(path):
            return BaseProcessor(tokenizer=AutoTokenizer.from_pretrained(name_or_path), **kwargs)
        with open(path, encoding='utf-8') as f:
            class_name = json.load(f).get('type', 'BaseProcessor')
        proc_cls = MindFormerRegister.get_cls(MindFormerModuleType.PROCESSOR, class_name, where=path)
        return proc_cls.from_pretrained(name_or_path, **kwargs)
