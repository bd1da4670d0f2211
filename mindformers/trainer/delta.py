"""Delta checkpoints: the trainable parameters of a model whose base is frozen (a PET delta such as LoRA's, with
their optimizer state), saved without the base and loaded over it.

With each delta checkpoint meta.json records `delta` (`delta_info`):
- `pet_config`: the model's PET config (`PetConfig.to_dict()`), None for a model frozen by other means;
- `base`: the base weights it was trained on: `checkpoint` (the file they came from; '' = a fresh model's initial
  weights), `parameters` (the number of frozen tensors), `layout` (SHA-256 of their names and shapes) and `sample`
  (8 values at fixed positions of up to 16 of them).

`load_weights` tells a delta checkpoint from a whole one by its content (it holds no frozen parameter). A delta must
hold every trainable parameter with the model's shape and nothing the model lacks; the recorded pet_config must
agree with the model's on every field that changes what the model computes (dropout rates aside, and the patterns
that chose the layers, which show in the parameter names); and the model's base weights must be the recorded ones:
the same names and shapes, the sampled values equal within bf16 rounding (so a base converted to another dtype
still passes). Anything else is one CheckpointError naming the keys, shapes or fields."""
import hashlib
import os

import numpy as np
import mindspore as ms

from mindformers.tools.checkpoint import CheckpointError, fit_problems, load_into_network, meta_entry
from mindformers.tools.logger import logger

__all__ = ['delta_info', 'is_delta', 'check_delta', 'load_weights', 'frozen_names']

_SAMPLED_TENSORS, _SAMPLED_VALUES = 16, 8
_RTOL, _ATOL = 1e-2, 1e-6  # bf16 keeps 8 significant bits: 2**-8 = 0.4 %
# fields compared through the parameter names they produce, or that only matter while training
_NOT_COMPARED = ('target_modules', 'exclude_layers', 'freeze_include', 'freeze_exclude')


def frozen_names(network):
    """The names of `network`'s parameters that do not train."""
    return {p.name for p in network.get_parameters() if not p.requires_grad}


def _frozen(network):
    return sorted((p for p in network.get_parameters() if not p.requires_grad), key=lambda p: p.name)


def _layout_digest(params):
    text = '\n'.join(f"{p.name}:{tuple(int(d) for d in p.shape)}" for p in params)
    return hashlib.sha256(text.encode()).hexdigest()


def _sample(param):
    """`_SAMPLED_VALUES` values of `param` at evenly spaced flat positions, as floats."""
    tensor = param.astype(ms.float32) if param.dtype == ms.bfloat16 else param  # NumPy has no bfloat16
    flat = np.asarray(tensor.asnumpy(), np.float32).reshape(-1)
    positions = np.linspace(0, flat.size - 1, _SAMPLED_VALUES).astype(np.int64)
    return [float(f"{value:.7g}") for value in flat[positions]]


def base_fingerprint(network, checkpoint=''):
    """The `base` record of `network`'s frozen weights (see the module doc)."""
    frozen = _frozen(network)
    matrices = [p for p in frozen if len(p.shape) >= 2] or frozen
    stride = max(len(matrices) / _SAMPLED_TENSORS, 1.0)
    chosen = [matrices[int(i * stride)] for i in range(min(len(matrices), _SAMPLED_TENSORS))]
    return {'checkpoint': checkpoint or '', 'parameters': len(frozen), 'layout': _layout_digest(frozen),
            'sample': {p.name: _sample(p) for p in chosen}}


def delta_info(network, base_checkpoint=''):
    """What meta.json records with a delta checkpoint of `network` (None when no parameter is frozen).
    `base_checkpoint`: where the base weights were loaded from ('' for a fresh model's initial weights)."""
    if not frozen_names(network):
        return None
    pet = getattr(network, 'pet_config', None)
    if base_checkpoint and os.path.exists(base_checkpoint):
        base_checkpoint = os.path.abspath(base_checkpoint)
    return {'pet_config': pet.to_dict() if pet is not None else None,
            'base': base_fingerprint(network, base_checkpoint)}


def _parameter_entries(params, own):
    """The entries of a checkpoint that are parameters: not training state of a parameter (`<state>.<name>`, e.g.
    `adam_m.<name>`) and not a scalar (counters, learning rate, loss scale)."""
    names = set()
    for name, value in params.items():
        if name in own:
            names.add(name)
            continue
        rest = name.split('.', 1)[-1]
        if not ('.' in name and (rest in params or rest in own)) and int(np.prod(value.shape)) > 1:
            names.add(name)
    return names


def is_delta(network, params, recorded=None):
    """True when the checkpoint `params` is to be read as a delta for `network`: it holds parameters of it but none
    of its frozen ones, or its meta.json `delta` (`recorded`) says it is one and the network freezes nothing (then
    `check_delta` says why it does not fit)."""
    frozen = frozen_names(network)
    if not frozen:
        return recorded is not None
    held = _parameter_entries(params, {p.name for p in network.get_parameters()})
    return bool(held) and not held & frozen


def _describe(pet):
    """'lora (lora_rank 8, lora_alpha 16, ...)' of a pet_config mapping."""
    fields = [f"{key} {value}" for key, value in pet.items() if key != 'pet_type' and value is not None]
    return f"{pet.get('pet_type')} ({', '.join(fields)})"


def _config_differences(saved, current):
    keys = [k for k in dict.fromkeys([*saved, *current]) if k not in _NOT_COMPARED and 'dropout' not in k]
    return [f"pet_config.{key} is {saved.get(key)!r} in the checkpoint, {current.get(key)!r} here"
            for key in keys if saved.get(key) != current.get(key)]


def _check_base(network, base, path):
    """Raise CheckpointError when `network`'s frozen weights are not the `base` a delta was trained on."""
    frozen = _frozen(network)
    own = {p.name: p for p in frozen}
    problems = []
    if base.get('layout') and base['layout'] != _layout_digest(frozen):
        problems.append(f"its base had {base.get('parameters')} frozen tensors, this model has {len(frozen)} of "
                        f"other names or shapes")
    for name, values in (base.get('sample') or {}).items():
        if name not in own:
            problems.append(f"{name} is not a frozen parameter here")
            continue
        got = _sample(own[name])
        if not np.allclose(got, values, rtol=_RTOL, atol=_ATOL):
            problems.append(f"{name} differs (trained on {values[:3]}, here {got[:3]})")
    if problems:
        source = base.get('checkpoint') or "a fresh model's initial weights (no base checkpoint)"
        raise CheckpointError(f"delta checkpoint {path} was trained on other base weights than this model holds: "
                              f"{problems[0]}{f' (+{len(problems) - 1} more)' if len(problems) > 1 else ''}; it "
                              f"was trained on {source}: load that as the base (model.model_config."
                              f"checkpoint_name_or_path)")


def check_delta(network, params, path, recorded=None):
    """Check that the delta checkpoint `params` (read from `path`; `recorded`: its meta.json `delta`, when there
    is one) fits `network` and its base weights; CheckpointError naming what does not."""
    own = {p.name: p for p in network.get_parameters()}
    pet = getattr(network, 'pet_config', None)
    saved = (recorded or {}).get('pet_config')
    if pet is None and saved:
        raise CheckpointError(f"{path} is a delta checkpoint of a {_describe(saved)} run (its trainable parameters "
                              f"only), but {type(network).__name__} has no PET delta: build the model with that "
                              f"pet_config (model.model_config.pet_config, or Trainer(pet_method="
                              f"{saved.get('pet_type')!r})) and its base weights in model.model_config."
                              f"checkpoint_name_or_path")
    held = _parameter_entries(params, own)
    trainable = {name for name, p in own.items() if p.requires_grad}
    problems = fit_problems(params, {n: own[n] for n in sorted(trainable)}, sorted(trainable - held),
                            sorted(held - own.keys()), 'not in this model')
    if saved and pet is not None:
        problems += _config_differences(saved, pet.to_dict())
    if problems:
        what = f"{type(network).__name__} with {_describe(pet.to_dict())}" if pet is not None else \
            type(network).__name__
        note = f"; it was saved by a {_describe(saved)} run" if saved else ''
        raise CheckpointError(f"delta checkpoint {path} does not fit {what}: {'; '.join(problems)}{note}")
    if recorded and recorded.get('base'):
        _check_base(network, recorded['base'], path)


def load_weights(network, params, path):
    """Load the checkpoint `params`, read from the file `path`, into `network`. A delta checkpoint (see `is_delta`,
    or one its meta.json marks as a delta) is checked by `check_delta` and loaded over the base weights the network
    holds; a whole one loads strictly, except that on a PET model a checkpoint without any delta parameter is the
    base (`BaseModel.check_checkpoint`): the delta keeps its initial values. Returns 'delta' or 'whole'."""
    if hasattr(network, 'fit_weights'):  # e.g. an int8 model quantizes the float weights of its int8 layers
        params = network.fit_weights(params)
    entry = meta_entry(path) if os.path.isfile(path) else None
    recorded = (entry or {}).get('delta')
    if is_delta(network, params, recorded):
        check_delta(network, params, path, recorded)
        if recorded is None:
            logger.info("%s holds no meta.json entry: the base weights and pet_config it was trained with are not "
                        "checked", path)
        trainable = [p for p in network.get_parameters() if p.requires_grad]
        for param in trainable:  # not load_param_into_net: it warns about every frozen parameter left as it is
            param.set_data(params[param.name].astype(param.dtype))
        logger.info("loaded the delta checkpoint %s (%d trainable tensors) over the base weights", path,
                    len(trainable))
        return 'delta'
    if getattr(network, 'pet_config', None) is not None and hasattr(network, 'check_checkpoint'):
        network.check_checkpoint(params, path)
        load_into_network(network, params, path, strict=False)
    else:
        load_into_network(network, params, path)
    return 'whole'
