"""What the per-family weight converters (`models/<family>/convert_<family>.py`) share.

Files. Reading, one tensor at a time (`mindformers.tools.weights.open_weights`): HuggingFace checkpoints
(safetensors, sharded `*.index.json`, `.bin`/`.pth` through `torch.load(weights_only=True)`; bfloat16 widened to
float32) and mindformers checkpoints. Writing: mindformers `.ckpt`/`.safetensors` (HF -> ours into a `.safetensors`
streams one tensor at a time) and HuggingFace safetensors files or directories, always atomically (temporary name,
then rename).

Names. A `NameTable` of `Rule`s maps a foreign format's tensor names onto ours ('{i}' stands for the layer index);
a rule may transpose, stack several of our tensors along dim 0 (split and joined by the model's own shapes) or
reorder rows. A `FamilyConverter` holds a family's tables and config mapping and runs the conversion both ways,
checking the input's shapes against those of the model built (without initialising it) from the config before any
tensor is read (`NameTable.plan`): every missing, unexpected and mis-shaped tensor is named, in the input's own
naming, in one ConversionError. HF -> ours then runs per tensor (`FamilyConverter.iter_hf_to_ms`); ours -> HF
still holds the whole model."""
import copy
import importlib
import json
import os
import re
import shutil
import tempfile

import numpy as np

from mindformers.tools.checkpoint import CheckpointError
from mindformers.tools.register.family import family_of_hf_config, hf_model_types
from mindformers.tools.weights import (CorruptWeightsError, TensorView, WeightSource, as_source,  # noqa: F401
                                       open_weights, write_safetensors)
from mindformers.tools.utils import UsageError


class ConversionError(ValueError):
    """Weights that do not fit the target model; the message names every offending tensor."""


class ConfigNeededError(ConversionError, UsageError):
    """The weights alone do not settle the architecture: the command line must name a config (convert_weight.py
    exits 2)."""


def hf_family(data):
    """(converter, tokenizer class name) of the registered family that reads a HF config.json mapping (see
    `FamilySpec.hf_model_types` / `hf_match`), or None when no family reads its model_type. The converter is
    what the family registered: a module path or an object."""
    spec = family_of_hf_config(data)
    return None if spec is None else (spec.converter, spec.class_name('tokenizer'))


def hf_conversion_module(data, config_path):
    """The conversion module of a HuggingFace config.json's parsed `data` (read from `config_path`); a model_type no
    family converts: ConversionError naming the supported ones."""
    spec = family_of_hf_config(data)
    if spec is None:
        raise ConversionError(f"{config_path} has model_type {data.get('model_type')!r}, which has no converter "
                              f"(supported HuggingFace model types: {', '.join(hf_model_types())})")
    return spec.load_converter()


def hf_directory_converter(path):
    """The FamilyConverter that reads `path` when it is a HuggingFace model directory (its config.json carries
    `model_type` and no `type`), else None (see `hf_conversion_module` for an unknown model_type)."""
    config_path = os.path.join(path, 'config.json')
    if not os.path.isdir(path) or not os.path.isfile(config_path):
        return None
    data = read_json(config_path)
    if 'type' in data or 'model_type' not in data:
        return None
    converter = hf_conversion_module(data, config_path)
    return getattr(converter, 'CONVERTER', converter)  # a family module, or the converter object itself


_HF_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin', 'pytorch_model.bin.index.json')


def load_hf_weights(path):
    """The tensors of a HF checkpoint as a `WeightSource` (a mapping name -> np.ndarray read on access, see
    `mindformers.tools.weights`): a directory holding one of `model.safetensors`, `model.safetensors.index.json`
    (sharded), `pytorch_model.bin` or `pytorch_model.bin.index.json`, or such a file itself. safetensors files are
    memory-mapped; `.bin` files are read with `torch.load(weights_only=True, mmap=True)`; bfloat16 is widened to
    float32 as each tensor is read."""
    if os.path.isdir(path):
        found = [name for name in _HF_FILES if os.path.isfile(os.path.join(path, name))]
        if not found:
            raise ConversionError(f"no HF weights in directory {path} (looked for {', '.join(_HF_FILES)})")
        path = os.path.join(path, found[0])
    if not os.path.isfile(path):
        raise ConversionError(f"input not found: {path}")
    if not path.endswith(('.index.json', '.safetensors', '.bin', '.pt', '.pth')):
        raise ConversionError(f"unsupported HF weight file {path} (expected .safetensors, .bin, .pt, .pth or "
                              f"*.index.json)")
    try:
        return open_weights(path)
    except CorruptWeightsError as err:
        raise ConversionError(f"HF weight file {err.path} is truncated or corrupt ({err.detail}); download or save "
                              f"it again") from None
    except CheckpointError as err:
        raise ConversionError(str(err)) from None


def open_ms_weights(path):
    """The tensors of a mindformers `.ckpt` or `.safetensors` file, a sharded `*.index.json` set, or a directory
    holding one (a checkpoint directory gives its newest checkpoint), as a `WeightSource` (see
    `tools.weights.open_weights`): read per tensor, bfloat16 widened to float32."""
    from mindformers.tools.checkpoint import resolve_checkpoint
    path = os.fspath(path)
    if not os.path.isdir(path) and not path.endswith('.index.json'):
        path = resolve_checkpoint(path)  # checks the file and the checksum meta.json records
    try:
        return open_weights(path)
    except CorruptWeightsError as err:
        raise CheckpointError(f"checkpoint {err.path} is truncated or corrupt ({err.detail}); use an earlier "
                              f"checkpoint or re-create it") from None


def load_ms_weights(path):
    """`open_ms_weights` read whole into a dict name -> np.ndarray."""
    source = open_ms_weights(path)
    return {name: source.read(name) for name in source.names()}


DTYPES = {'fp32': 'float32', 'fp16': 'float16', 'bf16': 'bfloat16'}


def _stored_dtype(dtype, cast=None):
    """The dtype a tensor read as `dtype` is written with: `cast` ('fp32' | 'fp16' | 'bf16') for floating-point
    ones, else as read (bfloat16 is read as float32)."""
    floating = dtype in ('float16', 'bfloat16', 'float32', 'float64')
    if cast and floating:
        return DTYPES[cast]
    return 'float32' if dtype == 'bfloat16' else dtype


def check_dtype(dtype):
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def save_ms_weights(weights, path, dtype=None):
    """Write name -> array as a MindSpore checkpoint (`.safetensors` by extension, else `.ckpt`), atomically.
    `dtype` ('fp32' | 'fp16' | 'bf16') casts floating-point tensors."""
    import mindspore as ms
    from mindformers.tools.checkpoint import save_checkpoint_atomic
    check_dtype(dtype)
    target = getattr(ms, DTYPES[dtype]) if dtype else None
    tensors = {}
    for name, value in weights.items():
        tensor = ms.Tensor(value)
        if target is not None and np.issubdtype(value.dtype, np.floating):
            tensor = tensor.astype(target)
        tensors[name] = tensor
    return save_checkpoint_atomic(tensors, path)


def _write_safetensors(weights, path, dtype=None):
    """Write name -> array to `path` in HF's safetensors layout; bfloat16 goes through torch (NumPy has none)."""
    floating = lambda value: np.issubdtype(value.dtype, np.floating)
    if dtype == 'bf16':
        import torch
        from safetensors.torch import save_file
        tensors = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in weights.items()}
        tensors = {name: t.to(torch.bfloat16) if t.is_floating_point() else t for name, t in tensors.items()}
    else:
        from safetensors.numpy import save_file
        tensors = {name: np.ascontiguousarray(value.astype(DTYPES[dtype]) if dtype and floating(value) else value)
                   for name, value in weights.items()}
    save_file(tensors, path, metadata={'format': 'pt'})


def save_hf_weights(weights, path, dtype=None):
    """Write name -> array as a HF `.safetensors` file, atomically (temporary file, then rename).
    `dtype` ('fp32' | 'fp16' | 'bf16') casts floating-point tensors."""
    if not path.endswith('.safetensors'):
        raise ConversionError(f"HF output must be a .safetensors file, got {path}")
    check_dtype(dtype)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.partial.{os.getpid()}")
    try:
        _write_safetensors(weights, tmp, dtype)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def refuse_non_empty(directory):
    if os.path.isdir(directory) and os.listdir(directory):
        raise ConversionError(f"output directory {directory} exists and is not empty; remove it or give another "
                              f"output path")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConversionError(f"output path {directory} exists and is not a directory (a HF model directory is "
                              f"written unless the path ends in .safetensors)")


def save_hf_directory(weights, hf_config, directory, dtype=None, config_file='config.json',
                      weights_file='model.safetensors'):
    """Write a HF model directory (`config_file` from the mapping `hf_config`, and `weights_file`), all or
    nothing: both files go into a hidden temporary directory beside `directory`, which is then renamed to it.
    An existing non-empty `directory` is refused."""
    check_dtype(dtype)
    directory = os.path.abspath(directory)
    refuse_non_empty(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.partial.", dir=parent)
    try:
        _write_safetensors(weights, os.path.join(tmp, weights_file), dtype)
        with open(os.path.join(tmp, config_file), 'w', encoding='utf-8') as f:
            json.dump(hf_config, f, indent=2)
        os.chmod(tmp, 0o755)  # mkdtemp creates it private
        os.replace(tmp, directory)  # replaces an empty directory; fails on one filled meanwhile
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


# ---------------------------------------------------------------------------------------------------------------
# name tables

_LAYER_INDEX = re.compile(r'\.(\d+)\.')


def _template(name):
    """(name with its first layer index replaced by '{i}', that index or None)."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        return name, None
    return f"{name[:match.start()]}.{{i}}.{name[match.end():]}", match.group(1)


def _fill(template, index):
    return template if index is None else template.replace('{i}', index)


def transpose(value):
    return np.ascontiguousarray(np.asarray(value).T)


class Rule:
    """One tensor of a foreign format: `theirs` holds `ours` (a name, or a tuple of names stacked along dim 0 in that
    order; pieces are split by the model's shapes). `transposed`: theirs is ours transposed. `to_ours(value, config)`
    / `to_theirs(value, config)`: shape-preserving reorderings applied after renaming / before renaming back."""

    def __init__(self, theirs, ours, transposed=False, to_ours=None, to_theirs=None):
        self.theirs = theirs
        self.ours = (ours,) if isinstance(ours, str) else tuple(ours)
        self.transposed = transposed
        self.to_ours = to_ours
        self.to_theirs = to_theirs

    def layout(self, shape):
        """A shape of ours as the foreign format lays it out."""
        return tuple(shape)[::-1] if self.transposed else tuple(shape)


class Problems:
    """Missing, unexpected and mis-shaped tensors, named as the input names them."""

    def __init__(self):
        self.missing, self.unexpected, self.mismatched = set(), set(), []

    def message(self):
        def listing(items):
            return f"{', '.join(items[:12])}{' ...' if len(items) > 12 else ''}"
        return '; '.join(f"{label} {listing(items)}" for label, items in (
            ('missing', sorted(self.missing)), ('unexpected', sorted(self.unexpected)),
            ('wrong shape', self.mismatched)) if items)


class NameTable:
    """Rules between one foreign naming and ours. Where several rules name the same tensor the first one is used
    for writing; `skip` (a regular expression) matches foreign entries that are not weights (e.g. RoPE buffers)."""

    def __init__(self, rules, skip=None):
        self.rules = [rule if isinstance(rule, Rule) else Rule(*rule) for rule in rules]
        self.skip = re.compile(skip) if skip else None
        self._theirs, self._ours = {}, {}
        for rule in self.rules:
            self._theirs.setdefault(rule.theirs, rule)
            for part, ours in enumerate(rule.ours):
                self._ours.setdefault(ours, (rule, part))

    def rule_of(self, name):
        """(rule, layer index) of a foreign name, or None."""
        key, index = _template(name)
        rule = self._theirs.get(key)
        return None if rule is None else (rule, index)

    def ours_of(self, name):
        """Our names held by the foreign tensor `name`, or None."""
        found = self.rule_of(name)
        return None if found is None else tuple(_fill(ours, found[1]) for ours in found[0].ours)

    def theirs_of(self, name):
        """The foreign name holding our tensor `name`, or None."""
        place = self.place_of(name)
        return None if place is None else place[0]

    def place_of(self, name):
        """(foreign name, rule, index of `name` among the rule's `ours`) of our tensor `name`, or None."""
        key, index = _template(name)
        found = self._ours.get(key)
        return None if found is None else (_fill(found[0].theirs, index), found[0], found[1])

    def known(self, names):
        """How many of `names` this naming knows (skipped entries included)."""
        return sum(1 for name in names if self.rule_of(name) or (self.skip and self.skip.search(name)))

    def plan(self, shapes, expected):
        """How foreign tensors (name -> shape; no data needed) become ours, checked against `expected` (our name
        -> shape): (steps, Problems). Each step is (foreign name, rule, our names): the tensor's data, renamed,
        transposed and split, gives those tensors."""
        steps, problems, covered = [], Problems(), set()
        for name, shape in shapes.items():
            if self.skip and self.skip.search(name):
                continue
            found = self.rule_of(name)
            if found is None:
                problems.unexpected.add(name)
                continue
            rule, index = found
            targets = tuple(_fill(ours, index) for ours in rule.ours)
            shape = rule.layout(shape)  # ours
            wanted = [expected.get(target) for target in targets]
            if None in wanted:
                problems.unexpected.add(name)
                continue
            stacked = (sum(s[0] for s in wanted),) + tuple(wanted[0][1:]) if len(targets) > 1 else wanted[0]
            if len(targets) > 1 and shape != stacked or len(targets) == 1 and shape != wanted[0]:
                problems.mismatched.append(f"{name} {rule.layout(shape)} (expected {rule.layout(stacked)})")
                covered.update(targets)
                continue
            steps.append((name, rule, targets))
            covered.update(targets)
        problems.missing.update(self.theirs_of(target) or target for target in expected if target not in covered)
        return steps, problems

    @staticmethod
    def run(source, steps, expected, config):
        """(our name, array) of each planned step (see `plan`), reading one foreign tensor at a time."""
        for name, rule, targets in steps:
            value = transpose(source[name]) if rule.transposed else np.asarray(source[name])
            pieces = [value] if len(targets) == 1 else \
                np.split(value, np.cumsum([expected[target][0] for target in targets])[:-1])
            for target, piece in zip(targets, pieces):
                yield target, rule.to_ours(piece, config) if rule.to_ours else piece

    def to_ours(self, state_dict, expected, config):
        """Foreign tensors (a mapping name -> array) -> (ours: name -> array, Problems), checked against `expected`
        (our name -> shape); nothing is converted when there are problems."""
        source = as_source(state_dict)
        steps, problems = self.plan(source.shapes(), expected)
        if problems.message():
            return {}, problems
        return dict(self.run(source, steps, expected, config)), problems

    def to_theirs(self, tensors, config):
        """Our tensors (complete and well-shaped) -> the foreign naming."""
        grouped = {}
        for name, value in tensors.items():
            key, index = _template(name)
            if key not in self._ours:
                raise ConversionError(f"{name} has no counterpart in the target format")
            rule, part = self._ours[key]
            value = rule.to_theirs(value, config) if rule.to_theirs else np.asarray(value)
            grouped.setdefault(_fill(rule.theirs, index), (rule, {}))[1][part] = value
        out = {}
        for name, (rule, parts) in grouped.items():
            value = parts[0] if len(rule.ours) == 1 else np.concatenate([parts[i] for i in range(len(rule.ours))])
            out[name] = transpose(value) if rule.transposed else value
        return out


# ---------------------------------------------------------------------------------------------------------------
# one family's conversion


def hf_rope_parameters(hf_config, default_theta=10000.0):
    """The RoPE settings of a HF config.json mapping as transformers 5 spells them (`rope_parameters`: rope_type,
    rope_theta, factor, partial_rotary_factor, ...), also read from the 4.x spelling (top-level `rope_theta` /
    `partial_rotary_factor`, `rope_scaling` with `type` or `rope_type`). rope_type defaults to 'default'."""
    rope = {key: hf_config[key] for key in ('rope_theta', 'partial_rotary_factor') if hf_config.get(key) is not None}
    for section in (hf_config.get('rope_scaling'), hf_config.get('rope_parameters')):
        if isinstance(section, dict):
            rope.update(section)
    if 'type' in rope:
        rope.setdefault('rope_type', rope.pop('type'))
    rope.setdefault('rope_type', 'default')
    rope.setdefault('rope_theta', default_theta)
    return rope


def read_json(path):
    """The JSON object in `path`, or a ConversionError saying what is wrong with the file."""
    with open(path, encoding='utf-8') as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON ({err})") from None
    if isinstance(data, dict):
        return data
    raise ConversionError(f"{path} does not hold a JSON object")


class FamilyConverter:
    """HuggingFace (or another foreign format) <-> mindformers weights for one model family.

    A family sets `family` (its name in messages), `config_class`, `model_class` ('module:Class', imported when the
    model's shapes are needed), `hf_model_types` (the `model_type`s of the HF configs it reads, the first one
    assumed when a config.json has none), `input_tables` (the namings it reads; each input is read with the one
    that knows most of its names) and `output_table` (the HF naming it writes), and implements `config_from_hf`
    and `config_to_hf`. Hooks with defaults: `prepare_hf`, `read_input`, `config_beside`, `infer_config`.
    `peft_tables`: the HF namings of the models PEFT LoRA adapters for this family are made on (the first one is
    written; see `mindformers.models.peft_adapter`); empty: no PEFT interop."""

    family = ''
    config_class = None
    model_class = ''
    hf_model_types = ()
    input_tables = ()
    output_table = None
    peft_tables = ()
    summary = ('vocab_size', 'hidden_size', 'num_layers', 'seq_length')

    # -- hooks ------------------------------------------------------------------------------------------------

    def config_from_hf(self, hf_config):
        """Our config from a HF `config.json` mapping."""
        raise NotImplementedError

    def config_to_hf(self, config, dtype='float32'):
        """The HF `config.json` mapping of our config; `dtype` names the stored tensors."""
        raise NotImplementedError

    def prepare_hf(self, state_dict, config):  # pylint: disable=unused-argument
        """Family checks or fixes on the foreign tensors before renaming; returns the state dict to convert."""
        return state_dict

    def read_input(self, input_path):
        """Foreign tensors (name -> array) of `input_path`."""
        return load_hf_weights(input_path)

    def config_beside(self, input_path, weights=None):  # pylint: disable=unused-argument
        """Our config from the `config.json` in (or beside) `input_path` (whose tensors `weights` were read from it),
        or None when there is none."""
        directory = input_path if os.path.isdir(input_path) else os.path.dirname(os.path.abspath(input_path))
        path = os.path.join(directory, 'config.json')
        return self.load_config(path) if os.path.isfile(path) else None

    def infer_config(self, weights, ms_names=False):  # pylint: disable=unused-argument
        """Our config sized from the tensors alone (HF names, or ours with `ms_names`)."""
        raise ConfigNeededError(f"the {self.family} architecture (e.g. the number of attention heads) cannot be "
                                f"told from the weights alone and no config.json was found beside them; give the "
                                f"model's config (convert_weight.py --config <config.json | run YAML>)")

    def is_ours(self, data):
        """Whether a config.json mapping was written by our config class (else it is a HF one)."""
        return 'type' in data

    # -- machinery --------------------------------------------------------------------------------------------

    def model_shapes(self, config, with_delta=False):
        """Our parameter names and shapes for `config`, read off a model built without initialising its weights;
        with `with_delta`, (shapes, the names of the PET delta that `config.pet_config` adds)."""
        from mindspore.nn.utils import no_init_parameters
        module, name = self.model_class.split(':')
        config = copy.copy(config)
        config.checkpoint_name_or_path = ''
        with no_init_parameters():
            model = getattr(importlib.import_module(module), name)(config)
        shapes = {p.name: tuple(p.shape) for p in model.get_parameters()}
        return (shapes, set(model.pet_parameter_names)) if with_delta else shapes

    def raise_if(self, config, problems):
        message = problems.message()
        if message:
            sizes = ', '.join(f"{name} {getattr(config, name)}" for name in self.summary)
            raise ConversionError(f"{self.family} weights do not fit the model ({sizes}): {message}")

    def convert_hf_to_ms(self, state_dict, config):
        """Foreign tensors (name -> array, in any naming of `input_tables`) -> our parameters (name -> array).
        With `config.pet_config`, the PET delta is optional as a whole: base weights alone convert to the base's
        tensors, and the delta alone (e.g. THUDM's P-Tuning v2 `prefix_encoder`) to the delta's."""
        return dict(self.iter_hf_to_ms(state_dict, config))

    def plan_hf_to_ms(self, state_dict, config):
        """(source, steps, expected) of a conversion (see `NameTable.plan`), checked on the tensor shapes alone:
        every missing, unexpected and mis-shaped tensor raises one ConversionError before any data is read."""
        expected, delta = self.model_shapes(config, with_delta=True)
        source = self.prepare_hf(as_source(state_dict), config)
        table = max(self.input_tables, key=lambda t: t.known(source))  # the first one on a tie
        if delta:
            given = {ours for name in source for ours in (table.ours_of(name) or ())}
            if not given & delta or given <= delta:
                expected = {name: shape for name, shape in expected.items() if (name in delta) == bool(given & delta)}
        steps, problems = table.plan(source.shapes(), expected)
        self.raise_if(config, problems)
        return source, table, steps, expected

    def iter_hf_to_ms(self, state_dict, config):
        """`convert_hf_to_ms` one tensor at a time: an iterator of (our name, array) reading each foreign tensor
        (from a `WeightSource` or a mapping) when it is reached. Problems are raised here, before any is read."""
        source, table, steps, expected = self.plan_hf_to_ms(state_dict, config)
        return table.run(source, steps, expected, config)

    def convert_ms_to_hf(self, state_dict, config):
        """Our parameters (name -> array) -> HF tensors in `output_table`'s naming. Entries outside the model's
        top-level names (optimizer states such as `adam_m.*`, `global_step`) are ignored."""
        expected, delta = self.model_shapes(config, with_delta=True)
        roots = {name.split('.', 1)[0] for name in expected}
        ours = {name: np.asarray(value) for name, value in state_dict.items() if name.split('.', 1)[0] in roots}
        if not delta & set(ours):  # base weights of a config with a pet_config
            expected = {name: shape for name, shape in expected.items() if name not in delta}
        problems = Problems()
        problems.missing.update(name for name in expected if name not in ours)
        problems.unexpected.update(name for name in ours if name not in expected)
        problems.mismatched.extend(f"{name} {value.shape} (expected {expected[name]})" for name, value in ours.items()
                                   if name in expected and value.shape != expected[name])
        self.raise_if(config, problems)
        return self.output_table.to_theirs(ours, config)

    def _config_from_json(self, path):
        data = read_json(path)
        if self.is_ours(data):
            kind = data.get('type', self.config_class.__name__)
            if kind != self.config_class.__name__:
                raise ConversionError(f"{path} describes a {kind}, not a {self.config_class.__name__}")
            return self.config_class.from_dict({k: v for k, v in data.items() if k != 'checkpoint_name_or_path'})
        model_type = data.get('model_type', self.hf_model_types[0])
        if model_type not in self.hf_model_types:
            raise ConversionError(f"{path} describes a {model_type!r} model, not {self.family}")
        return self.config_from_hf(data)

    def _config_from_yaml(self, path):
        from mindformers.tools.register.config import load_yaml_with_bases
        section = (load_yaml_with_bases(path).get('model') or {}).get('model_config')
        name = self.config_class.__name__
        if not isinstance(section, dict):
            raise ConversionError(f"{path} has no model.model_config section")
        if section.get('type', name) != name:
            raise ConversionError(f"{path}: model.model_config.type is {section['type']!r}, not {name}")
        return self.config_class(**{k: v for k, v in section.items() if k not in ('type', 'checkpoint_name_or_path')})

    def load_config(self, config):
        """`config` as our config: one already, or the path of a `.yaml` run config or a `.json` model config
        (ours, or HuggingFace's)."""
        if isinstance(config, self.config_class):
            return config
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise ConversionError(f"config file not found: {path}")
        try:
            return self._config_from_yaml(path) if path.endswith(('.yaml', '.yml')) else self._config_from_json(path)
        except (TypeError, ValueError) as err:
            if isinstance(err, ConversionError):
                raise
            raise ConversionError(f"config {path}: {err}") from None

    def convert_pt_to_ms(self, input_path, output_path, dtype=None, config=None):
        """Convert foreign weights (a HF directory or file, or what `read_input` accepts) into a MindSpore checkpoint
        file at `output_path`. The architecture comes from `config` (our config or a config file), else the config
        beside the weights, else the tensor shapes. Returns {our tensor name: shape} of what was written."""
        check_dtype(dtype)
        if os.path.isdir(output_path):
            raise ConversionError(f"output path {output_path} is a directory; give a checkpoint file "
                                  f"(.ckpt or .safetensors)")
        weights = self.read_input(input_path)
        if config is not None:
            config = self.load_config(config)
        else:
            config = self.config_beside(input_path, weights) or self.infer_config(weights)
        source, table, steps, expected = self.plan_hf_to_ms(weights, config)
        items = table.run(source, steps, expected, config)
        if output_path.endswith('.safetensors'):  # written one tensor at a time
            specs = [(target, _stored_dtype(source.dtype(name), dtype), expected[target])
                     for name, _, targets in steps for target in targets]
            write_safetensors(output_path, specs, (value for _, value in items))
        else:  # a .ckpt is written from all tensors at once
            save_ms_weights(dict(items), output_path, dtype)
        return {target: tuple(expected[target]) for _, _, targets in steps for target in targets}

    def convert_ms_to_pt(self, input_path, output_path, dtype=None, config=None):
        """Convert a mindformers checkpoint (`.ckpt`/`.safetensors`, or a checkpoint directory) to HF format.

        `output_path` ending in `.safetensors` gets that file; any other path becomes a HF model directory
        (`config.json` + `model.safetensors`) that transformers' `from_pretrained` loads. The architecture comes
        from `config` (our config or a config file), else a `config.json` beside the checkpoint, else the tensor
        shapes where the family can tell them. Returns {HF tensor name: shape}."""
        check_dtype(dtype)
        to_file = output_path.endswith('.safetensors')
        if not to_file:
            refuse_non_empty(os.path.abspath(output_path))
        weights = open_ms_weights(input_path)
        config = self.load_config(config) if config is not None else self.config_beside(input_path)
        if config is None:
            config = self.infer_config(weights, ms_names=True)
            if not to_file:
                self.guessed(config)
        converted = self.convert_ms_to_hf(weights, config)
        if to_file:
            save_hf_weights(converted, output_path, dtype)
        else:
            floating = [v.dtype for v in converted.values() if np.issubdtype(v.dtype, np.floating)]
            stored = DTYPES[dtype] if dtype else str(floating[0] if floating else np.dtype('float32'))
            save_hf_directory(converted, self.config_to_hf(config, stored), output_path, dtype)
        return {name: tuple(value.shape) for name, value in converted.items()}

    def guessed(self, config):
        """Called when a HF config.json is written from a config `infer_config` guessed."""

    def entry_points(self):
        """The module-level functions of a family module: convert_hf_to_ms, convert_ms_to_hf, convert_pt_to_ms,
        convert_ms_to_pt, load_config, config_from_hf, config_to_hf."""
        return (self.convert_hf_to_ms, self.convert_ms_to_hf, self.convert_pt_to_ms, self.convert_ms_to_pt,
                self.load_config, self.config_from_hf, self.config_to_hf)
