"""Making a model weight-only int8 (`quantize_model`), and turning the float weights of a checkpoint into the int8
ones such a model holds as they load (`quantizing_transform`, `quantized_weights`)."""
import copy

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor

from mindformers.modules.layers import Embedding, Linear, TiedLMHead
from mindformers.pet import forget_compiled, merge_pet
from mindformers.pet.freeze import DELTA_PREFIX
from mindformers.quantization.config import quantization_settings
from mindformers.quantization.formats import quantize
from mindformers.quantization.linear import Int8Embedding, Int8Linear, Int8TiedLMHead
from mindformers.tools.logger import logger


def quantization_of(model):
    """{'scheme', 'embeddings'} of a model `quantize_model` changed, else None."""
    return model.__dict__.get('quantization')


def _numpy(value):
    """A checkpoint entry (ndarray, Tensor or Parameter) as an ndarray (bf16 widened to fp32)."""
    if isinstance(value, Tensor):
        return (value.astype(ms.float32) if value.dtype == ms.bfloat16 else value).asnumpy()
    return np.asarray(value)


def _quantized(value, scheme, name):
    """(int8 weight, scale) of a float weight, the error naming `name`."""
    try:
        return quantize(_numpy(value).astype(np.float32, copy=False), scheme)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def _child(model, path):
    cell = model
    for part in path.split('.'):
        cell = cell[int(part)] if part.isdigit() else getattr(cell, part)
    return cell


def _tied_tables(model):
    """{path of a TiedLMHead: the name of the table it is tied to} (read from the model's `parameter_inputs`)."""
    inputs = getattr(model, 'parameter_inputs', None) or {}
    tables = {}
    for path, cell in model.cells_and_names():
        if isinstance(cell, TiedLMHead):
            names = [name for name, (primitive, _) in inputs.items() if primitive == f'{path}.matmul']
            if len(names) != 1:
                raise ValueError(f"{type(model).__name__}.{path} is a tied output head but the model's "
                                 f"parameter_inputs name no single table for {path}.matmul")
            tables[path] = names[0]
    return tables


def _quantize_tied_heads(model, scheme, weights):
    """Replace each TiedLMHead by an Int8TiedLMHead holding its own int8 copy of the (still float) table."""
    params = {p.name: p for p in model.get_parameters()}
    compute_dtype = getattr(model.config, 'compute_dtype', 'float32')
    for path, table_name in _tied_tables(model).items():
        table = params[table_name]
        q, s = _quantized(table, scheme, table_name) if weights else (None, None)
        head = Int8TiedLMHead.for_table(table, q, s, scheme, compute_dtype)
        parent, _, leaf = path.rpartition('.')
        setattr(_child(model, parent) if parent else model, leaf, head)
        head.weight.name, head.weight_scale.name = f'{path}.weight', f'{path}.weight_scale'
        model.__dict__.setdefault('int8_tied_heads', {})[path] = table_name


def _read_elsewhere(model):
    """Names of the parameters a primitive outside their own cell reads (the `parameter_inputs` the cells declare),
    e.g. GPT-2's position table added whole; reads by a tied head, which gets its own int8 copy, do not count."""
    heads = set(_tied_tables(model))
    names = set()
    for path, cell in model.cells_and_names():
        prefix = f'{path}.' if path else ''
        for param, (primitive, _) in (getattr(cell, 'parameter_inputs', None) or {}).items():
            owner, reader = (prefix + param).rpartition('.')[0], prefix + primitive
            if not reader.startswith(owner + '.') and reader.rpartition('.')[0] not in heads:
                names.add(prefix + param)
    return names


def quantize_model(model, scheme='block32', embeddings=False, weights=True):
    """Make `model` weight-only int8 in place and return it: every plain Linear becomes an `Int8Linear`; a tied
    output head an `Int8TiedLMHead` with its own int8 copy of the table; with `embeddings`, every Embedding an
    `Int8Embedding` (but a table the model also reads whole, as GPT-2 its positions, stays float). A LoRA delta is
    merged into the weights first; the layers of other PET algorithms stay float.
    `weights=False` changes only the structure: the int8 parameters are zero placeholders (a checkpoint loaded
    through `quantized_weights` fills them) and no float weight is read. The model records the settings
    (`quantization_of`) and `model.config` becomes a copy with `quantization: int8` and `quantization_config`, so
    that a saved model loads back int8."""
    settings = quantization_settings('int8', {'scheme': scheme, 'embeddings': embeddings}, 'quantize_model')
    done = quantization_of(model)
    if done is not None:
        if done != settings:
            raise ValueError(f"{type(model).__name__} is already int8 with {done}; build it again to quantize with "
                             f"{settings}")
        return model
    pet = getattr(model, 'pet_config', None)
    if pet is not None and pet.pet_type == 'lora':
        logger.info("quantize_model: merging the LoRA delta into the weights before quantizing")
        merge_pet(model)
    whole = _read_elsewhere(model)
    _quantize_tied_heads(model, scheme, weights)
    changed = 0
    for _, cell in list(model.cells_and_names()):
        kind = Int8Linear if type(cell) is Linear else Int8Embedding if embeddings and type(cell) is Embedding \
            else None
        if kind is None or DELTA_PREFIX in cell.weight.name or cell.weight.name in whole:
            continue
        q, s = _quantized(cell.weight, scheme, cell.weight.name) if weights else (None, None)
        kind.adopt(cell, q, s, scheme)
        changed += 1
    model.__dict__['quantization'] = settings
    if getattr(model, 'config', None) is not None:  # a copy: the config may be shared with other models
        model.config = copy.copy(model.config)
        model.config.quantization, model.config.quantization_config = 'int8', dict(settings)
    forget_compiled(model)
    logger.info("%s: %d layers int8 (%s%s)", type(model).__name__, changed + len(_int8_heads(model)), scheme,
                ', embeddings too' if embeddings else '')
    return model


def _int8_heads(model):
    """{table name: Int8TiedLMHead tied to it}."""
    return {table: _child(model, path) for path, table in model.__dict__.get('int8_tied_heads', {}).items()}


def quantizing_transform(model, source_names=None):
    """`transform(name, array) -> [(name, array), ...]` turning a checkpoint entry into what the int8 `model` holds:
    the float weight of an int8 layer becomes `name` int8 and `<name>_scale`; an entry already int8 passes. A tied
    head's int8 copy is made from its table as the table passes (float: quantized once for both; int8 with its
    scale, as an int8 checkpoint holds it: copied), unless `source_names` (the names the checkpoint holds, when
    known) include the head's own weight. Everything else passes unchanged."""
    int8 = {cell.weight.name: cell for _, cell in model.cells_and_names()
            if isinstance(cell, (Int8Linear, Int8Embedding)) and not isinstance(cell, Int8TiedLMHead)}
    heads = {table: head for table, head in _int8_heads(model).items()
             if source_names is None or head.weight.name not in source_names}

    def transform(name, array):
        head = heads.get(name) or heads.get(name[:-len('_scale')] if name.endswith('_scale') else None)
        if name.endswith('_scale'):
            return [(name, array)] + ([(head.weight_scale.name, array)] if head is not None else [])
        floating = _numpy(array) if (name in int8 or head is not None) else None
        if floating is None or floating.dtype == np.int8:
            return [(name, array)] + ([(head.weight.name, array)] if head is not None else [])
        scheme = (int8.get(name) or head).scheme
        q, s = _quantized(floating, scheme, name)
        out = [(name, q), (name + '_scale', s)] if name in int8 else [(name, array)]
        if head is not None:
            out += [(head.weight.name, q), (head.weight_scale.name, s)]
        return out

    return transform


def quantized_weights(model, params):
    """`params` (name -> Parameter / Tensor / ndarray, a checkpoint's) as the int8 `model` holds them (see
    `quantizing_transform`); the new entries are Parameters."""
    transform = quantizing_transform(model, set(params))
    out = {}
    for name, value in params.items():
        for new, array in transform(name, value):
            out[new] = array if array is value else Parameter(Tensor(np.ascontiguousarray(array)), name=new)
    return out


def quantized_state(model):
    """{name: Parameter} that an int8 checkpoint of `model` holds: every parameter but the tied heads' int8 copies,
    which loading makes again from the table."""
    derived = set()
    for head in _int8_heads(model).values():
        derived |= {head.weight.name, head.weight_scale.name}
    return {p.name: p for p in model.get_parameters() if p.name not in derived}
