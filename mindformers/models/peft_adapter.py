"""LoRA adapters in HuggingFace PEFT's format, both ways: a directory with `adapter_config.json` and
`adapter_model.safetensors` (or the older `adapter_model.bin`), tensors `base_model.model.<HF module>.lora_A.weight`
[r, in] and `base_model.model.<HF module>.lora_B.weight` [out, r], for the families whose weight converter declares
`peft_tables` (GPT-2 as `GPT2LMHeadModel`, LLaMA as `LlamaForCausalLM`, GLM2 as `GlmForCausalLM`).

Names come from the family's converter: each of our Linears maps to the HF module holding its weight. HF Conv1D
layers (GPT-2) store the weight transposed, not the LoRA factors: `fan_in_fan_out` is written true and A, B keep
their shapes. Where one HF module holds several of our Linears stacked by rows (GLM2's `mlp.gate_up_proj` =
[gate_proj; up_proj]):
- saving: one adapted part gives a rank-r LoRA whose B has zero rows for the other parts; several give a rank k*r
  LoRA (k parts): A the parts' A stacked, B block-diagonal, with `rank_pattern` k*r and `alpha_pattern` k*alpha so
  the scale alpha / r is unchanged;
- loading: rank r gives every part the shared A and its rows of B; rank k*r with B block-diagonal in part order
  gives each part its own block; anything else is refused.
A naming's row reordering of a weight (`Rule.to_ours` / `to_theirs`) is applied to B's rows too; A is input-side.

Loading checks everything before changing the model: the options (rsLoRA, DoRA, trained biases, modules_to_save,
layers_to_transform, ... are refused by name), every key (missing: a module `target_modules` selects has no factors;
unexpected: a key for a module the model lacks, e.g. an adapter for a deeper base) and every shape ([r, in] for
lora_A, [out, r] for lora_B, named with the expected shape)."""
import math
import os
import re
from collections import namedtuple

import numpy as np
import mindspore as ms

from mindformers.models.convert_utils import load_hf_weights, read_json, save_hf_directory
from mindformers.pet import LoraConfig, LoRALinear, apply_pet, select_linears
from mindformers.pet.lora import LORA_A, LORA_B
from mindformers.pet.targets import linear_paths
from mindformers.tools.register.family import families, family_of_config

__all__ = ['PeftAdapterError', 'load_peft_adapter', 'save_peft_adapter', 'covering_names']

CONFIG_FILE, WEIGHTS_FILE, LEGACY_WEIGHTS_FILE = 'adapter_config.json', 'adapter_model.safetensors', 'adapter_model.bin'
PREFIX = 'base_model.model.'
_KEY = re.compile(r'base_model\.model\.(.+)\.lora_([AB])\.weight')

# adapter_config.json keys read here, and keys that change nothing about the adapter's function; any other key must
# be unset (null / false / empty), else the option is refused
_READ = {'peft_type', 'task_type', 'r', 'lora_alpha', 'lora_dropout', 'target_modules', 'exclude_modules',
         'rank_pattern', 'alpha_pattern', 'bias', 'fan_in_fan_out', 'init_lora_weights'}
_INERT = {'base_model_name_or_path', 'revision', 'inference_mode', 'peft_version', 'auto_mapping', 'megatron_core',
          'qalora_group_size'}
_WHY = {'use_rslora': 'rsLoRA scales by lora_alpha / sqrt(r); LoRA here scales by lora_alpha / r',
        'use_dora': 'DoRA adds a magnitude vector per layer, which LoRA here does not have',
        'modules_to_save': 'the adapter would replace whole modules of the base model',
        'layers_to_transform': 'not supported (a target_modules list of full module paths selects layers)',
        'layers_pattern': 'not supported (a target_modules list of full module paths selects layers)',
        'lora_bias': 'LoRA here adds no bias to lora_B'}
_PLAIN_INITS = (True, False, 'gaussian')  # others (pissa, olora, loftq, corda, eva, ...) also change the base


class PeftAdapterError(ValueError):
    """A PEFT adapter that cannot be written for, or loaded into, a model; the message names the key or option."""


# ---------------------------------------------------------------------------------------------------------------
# names

HFModule = namedtuple('HFModule', 'path rule parts')  # parts: [(our Linear path, Linear)] in the rule's row order


def _peft_tables(spec):
    """The PEFT namings the converter of family `spec` declares (none without a converter)."""
    if spec is None or spec.converter is None:
        return ()
    converter = spec.load_converter()
    return getattr(getattr(converter, 'CONVERTER', converter), 'peft_tables', ())


def _namings(model):
    """The PEFT namings (NameTables; the first one is written) of `model`'s family."""
    tables = _peft_tables(family_of_config(type(getattr(model, 'config', None))))
    if not tables:
        supported = [name for name, spec in families().items() if _peft_tables(spec)]
        raise PeftAdapterError(f"{type(model).__name__}: PEFT adapters are made on HuggingFace models; the families "
                               f"with a HuggingFace naming for them are {', '.join(supported)}")
    return tables


def _hf_modules(model, table):
    """{HF module path: HFModule} for every Linear of `model` that `table` names, in model order."""
    linears = {cell.weight.name: (path, cell) for path, cell in linear_paths(model).items()}
    modules = {}
    for weight in linears:
        place = table.place_of(weight)
        if place is None or not place[0].endswith('.weight') or place[0][:-len('.weight')] in modules:
            continue
        parts = [linears.get(name) for name in table.ours_of(place[0])]
        if None not in parts:
            modules[place[0][:-len('.weight')]] = HFModule(place[0][:-len('.weight')], place[1], parts)
    return modules


def covering_names(chosen, candidates):
    """The shortest dotted suffixes that select exactly `chosen` among `candidates` (paths), in the list semantics
    PEFT and `pet_config.target_modules` share (a path equal to the name or ending in `.<name>`): ['q_proj',
    'v_proj'] where every layer's q and v projections are chosen, 'attn.c_proj' where 'c_proj' would also select
    'mlp.c_proj', full paths where only some layers are."""
    chosen = set(chosen)
    names = []
    for path in sorted(chosen):
        parts = path.split('.')
        for start in range(len(parts) - 1, -1, -1):
            name = '.'.join(parts[start:])
            if all(c in chosen for c in candidates if c == name or c.endswith('.' + name)):
                break
        if name not in names:
            names.append(name)
    return sorted(names)


def _selects(pattern, path):
    """PEFT's target_modules / exclude_modules semantics: a string is a regex matching the whole path, a list
    holds names matching a path equal to them or ending in `.<name>`."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    return any(path == name or path.endswith('.' + name) for name in pattern)


def _pattern_value(patterns, path, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of `path` at a dot."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


# ---------------------------------------------------------------------------------------------------------------
# saving


def _factors(cell):
    return tuple(getattr(cell, name).astype(ms.float32).asnumpy() for name in (LORA_A, LORA_B))


def _export(module, rank, config):
    """(A [R, in], B [sum of the parts' out, R]) of one HF module from its parts' LoRAs (see the module doc)."""
    adapted = [isinstance(cell, LoRALinear) for _, cell in module.parts]
    rows = [cell.out_features for _, cell in module.parts]
    blocks = 1 if sum(adapted) == 1 else len(module.parts)
    a = np.zeros((blocks * rank, module.parts[0][1].in_features), np.float32)
    b = np.zeros((sum(rows), blocks * rank), np.float32)
    for j, (_, cell) in enumerate(module.parts):
        if not adapted[j]:
            continue
        block = 0 if blocks == 1 else j
        part_a, part_b = _factors(cell)
        if module.rule.to_theirs:
            part_b = module.rule.to_theirs(part_b, config)
        a[block * rank:(block + 1) * rank] = part_a
        b[sum(rows[:j]):sum(rows[:j + 1]), block * rank:(block + 1) * rank] = part_b
    return a, b


def save_peft_adapter(model, directory, base_model_name_or_path=None):
    """Write `model`'s LoRA as a PEFT adapter directory (a new or empty `directory`, written all or nothing):
    `adapter_config.json` (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout, target_modules as HF
    module names, fan_in_fan_out for HF Conv1D layers, `base_model_name_or_path` as given) and
    `adapter_model.safetensors` (fp32, as PEFT keeps adapters). `PeftModel.from_pretrained(<HF model>, directory)`
    then computes what `model` computes. Returns `directory`."""
    config = getattr(model, 'pet_config', None)
    if config is None or config.pet_type != 'lora':
        kind = 'no PET' if config is None else config.pet_type
        raise PeftAdapterError(f"{type(model).__name__} has {kind}; only a LoRA adapter can be saved for PEFT")
    table = _namings(model)[0]
    modules = _hf_modules(model, table)
    adapted = {path: m for path, m in modules.items() if any(isinstance(cell, LoRALinear) for _, cell in m.parts)}
    stray = sorted(set(p for p, cell in linear_paths(model).items() if isinstance(cell, LoRALinear))
                   - {p for m in adapted.values() for p, _ in m.parts})
    if stray:
        raise PeftAdapterError(f"LoRA layers without a HuggingFace counterpart: {', '.join(stray)}")
    rank, alpha = config.lora_rank, config.lora_alpha
    tensors, stacked = {}, {}
    for path, module in adapted.items():
        a, b = _export(module, rank, model.config)
        tensors[f'{PREFIX}{path}.lora_A.weight'], tensors[f'{PREFIX}{path}.lora_B.weight'] = a, b
        if a.shape[0] != rank:
            stacked.setdefault(a.shape[0] // rank, []).append(path)
    rank_pattern, alpha_pattern = {}, {}
    for blocks, paths in stacked.items():
        for name in covering_names(paths, modules):
            rank_pattern[re.escape(name)], alpha_pattern[re.escape(name)] = blocks * rank, blocks * alpha
    peft_config = {
        'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base_model_name_or_path,
        'r': rank, 'lora_alpha': alpha, 'lora_dropout': config.lora_dropout,
        'target_modules': covering_names(adapted, modules), 'exclude_modules': None,
        'rank_pattern': rank_pattern, 'alpha_pattern': alpha_pattern,
        'fan_in_fan_out': any(m.rule.transposed for m in adapted.values()), 'bias': 'none', 'use_rslora': False,
        'use_dora': False, 'modules_to_save': None, 'layers_to_transform': None, 'layers_pattern': None,
        'init_lora_weights': True, 'inference_mode': True}
    return save_hf_directory(tensors, peft_config, os.fspath(directory), config_file=CONFIG_FILE,
                             weights_file=WEIGHTS_FILE)


# ---------------------------------------------------------------------------------------------------------------
# loading


def _positive(value):
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0 and math.isfinite(value)


def read_peft_config(directory):
    """The LoRA settings of `directory/adapter_config.json` with PEFT's defaults filled in (r 8, lora_alpha 8,
    lora_dropout 0, bias 'none'); PeftAdapterError naming the file and key for anything not representable here."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise PeftAdapterError(f"{directory} is not a PEFT adapter directory: it has no {CONFIG_FILE}")
    data = read_json(path)

    def refuse(key, why):
        raise PeftAdapterError(f"{path}: {key} = {data.get(key)!r}: {why}")

    if data.get('peft_type') != 'LORA':
        refuse('peft_type', "only LORA adapters can be loaded")
    if data.get('task_type') not in (None, 'CAUSAL_LM'):
        refuse('task_type', "only CAUSAL_LM adapters fit a causal language model")
    for key, value in data.items():
        if key not in _READ | _INERT and value not in (None, False, 0, '', [], {}):
            refuse(key, _WHY.get(key, "this PEFT option is not supported here"))
    if data.get('bias', 'none') != 'none':
        refuse('bias', "trained biases are not supported (only bias 'none')")
    if data.get('init_lora_weights', True) not in _PLAIN_INITS:
        refuse('init_lora_weights', "this initialisation changes the base weights too; convert the adapter to plain "
                                    "LoRA first (PEFT's path_initial_model_for_weight_conversion)")
    config = {'r': data.get('r', 8), 'lora_alpha': data.get('lora_alpha', 8),
              'lora_dropout': data.get('lora_dropout', 0.0) or 0.0,
              'rank_pattern': data.get('rank_pattern') or {}, 'alpha_pattern': data.get('alpha_pattern') or {}}
    for key in ('r', 'lora_alpha'):
        if not _positive(config[key]):
            refuse(key, "must be a positive number" + (" (an integer)" if key == 'r' else ''))
    if not isinstance(config['r'], int):
        refuse('r', "must be a positive integer")
    for key in ('rank_pattern', 'alpha_pattern'):
        values = config[key]
        if not isinstance(values, dict) or not all(_positive(v) for v in values.values()):
            refuse(key, "must map module names to positive numbers")
    if not 0 <= config['lora_dropout'] < 1:
        refuse('lora_dropout', "must be in [0, 1)")
    for key in ('target_modules', 'exclude_modules'):
        value = data.get(key)
        if key == 'exclude_modules' and not value:
            value = None
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
            value = tuple(value)
        elif not isinstance(value, str) or not value:
            refuse(key, "must be a regex string, 'all-linear' or a non-empty list of module names")
        config[key] = 'all-linear' if isinstance(value, str) and value.lower() == 'all-linear' else value
    return config


def _read_weights(directory):
    for name in (WEIGHTS_FILE, LEGACY_WEIGHTS_FILE):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path, load_hf_weights(path)
    raise PeftAdapterError(f"PEFT adapter {directory} has no {WEIGHTS_FILE} (or {LEGACY_WEIGHTS_FILE})")


def _targeted(config, modules):
    """The HF module paths PEFT's target_modules / exclude_modules select among `modules` ('all-linear': every
    Linear but the output head, `lm_head`)."""
    targets, exclude = config['target_modules'], config['exclude_modules']
    if targets == 'all-linear':
        chosen = [path for path in modules if path != 'lm_head']
    else:
        chosen = [path for path in modules if _selects(targets, path)]
    return [path for path in chosen if not (exclude and _selects(exclude, path))]


def _split(module, a, b, rank, config):
    """{our Linear path: (A [rank, in], B [out, rank])} of one HF module's factors (see the module doc)."""
    rows = [cell.out_features for _, cell in module.parts]
    pieces = np.split(b, np.cumsum(rows)[:-1])
    if module.rule.to_ours:
        pieces = [module.rule.to_ours(piece, config) for piece in pieces]
    total, blocks = a.shape[0], len(module.parts)
    block = lambda j: slice(j * rank, (j + 1) * rank)
    if total == rank:
        found = {path: (a, piece) for (path, _), piece in zip(module.parts, pieces)}
    elif total == blocks * rank and not any(np.any(np.delete(piece, block(j), axis=1))
                                            for j, piece in enumerate(pieces)):
        found = {path: (a[block(j)], piece[:, block(j)]) for j, ((path, _), piece) in enumerate(zip(module.parts,
                                                                                                   pieces))}
    else:
        raise PeftAdapterError(f"{module.path} has LoRA rank {total}: a rank other than r = {rank} is only "
                               f"understood for a module stacking {blocks} of our layers, as {blocks} rank-{rank} "
                               f"blocks with a block-diagonal lora_B (one rank for every layer here)")
    if any(np.any(piece) for _, piece in found.values()):  # a zero part beside a non-zero one had no LoRA when saved
        found = {path: factors for path, factors in found.items() if np.any(factors[1])}
    return found


def _problems(unexpected, missing, mismatched):
    shown = lambda items: ', '.join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else '')
    return '; '.join(f"{label} {shown(items)}" for label, items in (
        ('unexpected', sorted(unexpected)), ('missing', sorted(missing)), ('wrong shape', mismatched)) if items)


def load_peft_adapter(model, directory):
    """Load the PEFT LoRA adapter in `directory` into `model` (in place; returns it). A model without PET gets LoRA
    with the adapter's r, lora_alpha, lora_dropout on the layers it covers (`model.pet_config` then says which); a
    model with LoRA must already have that rank, alpha and those layers. Nothing changes unless everything fits:
    PeftAdapterError names the refused option, every missing and unexpected key and every mis-shaped factor."""
    directory = os.fspath(directory)
    config = read_peft_config(directory)
    weights_path, weights = _read_weights(directory)
    factors, unexpected = {}, []
    for key in weights:
        match = _KEY.fullmatch(key)
        if match is None:
            unexpected.append(key)
        else:
            factors.setdefault(match.group(1), {})[match.group(2)] = np.asarray(weights[key], np.float32)
    tables = _namings(model)
    modules = max((_hf_modules(model, table) for table in tables), key=lambda mods: len(set(mods) & set(factors)))
    targeted = _targeted(config, modules)
    if not targeted:
        raise PeftAdapterError(f"{directory}: target_modules {config['target_modules']!r} selects no module of the "
                               f"HuggingFace model of {type(model).__name__} (its modules: "
                               f"{', '.join(covering_names(modules, modules))})")
    missing, mismatched = [], []
    rank, alpha = config['r'], config['lora_alpha']
    for path in sorted(set(factors) - set(targeted)):
        unexpected += [f'{PREFIX}{path}.lora_{f}.weight' for f in sorted(factors[path])]
    for path in targeted:
        module = modules[path]
        module_rank = _pattern_value(config['rank_pattern'], path, rank)
        expected = {'A': (module_rank, module.parts[0][1].in_features),
                    'B': (sum(cell.out_features for _, cell in module.parts), module_rank)}
        for f in 'AB':
            key = f'{PREFIX}{path}.lora_{f}.weight'
            value = factors.get(path, {}).get(f)
            if value is None:
                missing.append(key)
            elif value.shape != expected[f]:
                mismatched.append(f"{key} {value.shape} (expected {expected[f]}: lora_{f} is "
                                  f"{'[r, in_features]' if f == 'A' else '[out_features, r]'})")
    problems = _problems(unexpected, missing, mismatched)
    if problems:
        raise PeftAdapterError(f"PEFT adapter {weights_path} does not fit {type(model).__name__}: {problems}")
    parts = {}
    for path in targeted:
        module_alpha = _pattern_value(config['alpha_pattern'], path, alpha)
        module_rank = _pattern_value(config['rank_pattern'], path, rank)
        if not math.isclose(module_alpha / module_rank, alpha / rank, rel_tol=1e-9):
            raise PeftAdapterError(f"{directory}: rank_pattern / alpha_pattern scale {path} by {module_alpha}/"
                                   f"{module_rank} and the rest by {alpha}/{rank}; one scale for every layer is "
                                   f"supported here")
        parts.update(_split(modules[path], factors[path]['A'], factors[path]['B'], rank, model.config))
    linears = linear_paths(model)
    loaded = _ensure_lora(model, sorted(parts), linears, rank, alpha, config['lora_dropout'], directory,
                          idle=lambda path: not np.any(parts[path][1]))
    for path in loaded:
        cell, (a, b) = linears[path], parts[path]
        for name, value in ((LORA_A, a), (LORA_B, b)):
            param = getattr(cell, name)
            param.set_data(ms.Tensor(np.ascontiguousarray(value), ms.float32).astype(param.dtype))
    return model


def _ensure_lora(model, paths, linears, rank, alpha, dropout, directory, idle):
    """Give `model` LoRA on `paths` with `rank` and `alpha` if it has no PET; else check it has exactly that (a
    path where `idle(path)`, a zero update, may lack LoRA in the model). Returns the paths to load."""
    config = getattr(model, 'pet_config', None)
    if config is None:
        lora = LoraConfig(lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout,
                          target_modules=covering_names(paths, linears))
        if sorted(p for p, _ in select_linears(model, lora.target_modules)) != paths:
            raise AssertionError(f"target_modules {lora.target_modules} do not select {paths}")
        apply_pet(model, lora)
        return paths
    if config.pet_type != 'lora':
        raise PeftAdapterError(f"{type(model).__name__} has {config.pet_type}; a LoRA adapter needs a model without "
                               f"PET or with LoRA")
    if (config.lora_rank, float(config.lora_alpha)) != (rank, float(alpha)):
        raise PeftAdapterError(f"{directory} has r {rank}, lora_alpha {alpha}; the model's LoRA has lora_rank "
                               f"{config.lora_rank}, lora_alpha {config.lora_alpha}")
    have = sorted(p for p, cell in linears.items() if isinstance(cell, LoRALinear))
    paths = [p for p in paths if p in have or not idle(p)]
    if have != paths:
        extra, lacking = sorted(set(have) - set(paths)), sorted(set(paths) - set(have))
        raise PeftAdapterError(f"{directory} covers other layers than the model's LoRA: "
                               + '; '.join(f"{label} {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                                           for label, items in (('only in the model', extra),
                                                                ('only in the adapter', lacking)) if items))
    return paths
