"""Imports point one way: a module of `mindformers/` imports at module level only from its own layer or an earlier
one (DESIGN's layout). Lazy imports inside functions that point up are allowed only as listed in LAZY_UP, each
with its reason; a listed one that no longer exists fails too, so the list stays true. The registry's import of
the library's packages on its first lookup (`tools.register.register.LIBRARY_PACKAGES`) is by name and not seen
here; `test_the_registry_loads_only_later_layers` checks it."""
import ast
import os
import subprocess
import sys

import pytest

from mindformers.tools.register import register

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'mindformers')

# DESIGN's layer list, with these placements changed: pet sits below models (its algorithms wrap and extend the
# blocks of modules/ and walk a model as cells, needing nothing of models/, while a model applies its config's
# pet_config when it is built); quantization sits between pet and models (its int8 layers replace the blocks of
# modules/ in any model, merging a LoRA first, and a model quantizes itself as its config asks when it loads);
# wrapper (compiled train-step cells) sits below trainer, which composes them. generation sits above models and
# pet: it drives any model through its one forward and a decoding session; `model.generate` reaches it lazily
# (listed below).
LAYERS = ('tools', 'kernels', 'parallel', 'core', 'dataset', 'modules', 'pet', 'quantization', 'models', 'generation',
          'pipeline', 'wrapper', 'trainer', 'evaluation', 'serving', 'cli')

# Command-line entry points kept under tools/ at the paths users know (DESIGN: "cli/ (or tools/*)"): the top layer,
# thin over the library.
ENTRY_POINTS = ('mindformers.tools.transform_ckpt', 'mindformers.tools.transform_ckpt_lora',
                'mindformers.tools.export_strategy', 'mindformers.tools.hccl_tools',
                'mindformers.tools.merge_hccl', 'mindformers.tools.msrun_summary', 'mindformers.tools.msrun_worker',
                'mindformers.tools.train_tokenizer', 'mindformers.tools.train_sentencepiece',
                'mindformers.tools.quantize',
                'mindformers.tools.dataset_preprocess', 'mindformers.serve')

# Old module paths users may import, kept as re-exports of the module that replaced them (nothing but imports).
OLD_PATHS = {'mindformers.tools.model_book': 'mindformers.models.model_book',
             'mindformers.models.chat_templates': 'mindformers.dataset.chat_templates'}

# (module, imported module): why the import must point up and stay inside a function.
LAZY_UP = {
    ('mindformers.parallel.layout', 'mindformers.models.auto.auto_class'):
        'parameter_layouts(model_config) builds the model class the config\'s family registered',
    ('mindformers.tools.register', 'mindformers.trainer.run_config'):
        'the old name mindformers.tools.register.validate_run_config, resolved on first use',
    ('mindformers.models.base_model', 'mindformers.generation.text_generator'):
        'model.generate(...) (the method users know, as in HF) runs generation.generate over the model',
    ('mindformers.models.chat', 'mindformers.generation.streamers'):
        'stream_chat streams through the generation layer\'s TextIteratorStreamer',
}


def _module_name(path):
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-len('.py')].replace(os.sep, '.')
    return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def _layer(module):
    if any(module == e or module.startswith(e + '.') for e in ENTRY_POINTS):
        return 'cli'
    parts = module.split('.')
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _imports(path, module):
    """(imported module, line, inside a function) for every import of a `mindformers` module in `path`."""
    package = module if path.endswith('__init__.py') else module.rsplit('.', 1)[0]
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ''
                if child.level:
                    parts = package.split('.')[:len(package.split('.')) - child.level + 1]
                    base = '.'.join(parts + ([child.module] if child.module else []))
                found.append((base, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return [(name, line, lazy) for name, line, lazy in found if name.startswith('mindformers.')]


def _scan():
    rows = []
    for root, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith('.py'):
                path = os.path.join(root, name)
                module = _module_name(path)
                rows += [(module, path, *row) for row in _imports(path, module)]
    return rows


def _upward(rows):
    for module, path, target, line, lazy in rows:
        if module in OLD_PATHS:
            continue
        mine, theirs = _layer(module), _layer(target)
        if mine and theirs and LAYERS.index(theirs) > LAYERS.index(mine):
            yield module, target, f"{os.path.relpath(path, os.path.dirname(PACKAGE))}:{line}", lazy


def test_module_level_imports_point_down():
    wrong = [f"{where} ({_layer(module)}) imports {target} ({_layer(target)})"
             for module, target, where, lazy in _upward(_scan()) if not lazy]
    assert not wrong, "imports from a later layer:\n" + '\n'.join(wrong)


def test_lazy_upward_imports_are_the_listed_ones():
    found = {(module, target): where for module, target, where, lazy in _upward(_scan()) if lazy}
    unlisted = [f"{where}: {module} -> {target}" for (module, target), where in found.items()
                if (module, target) not in LAZY_UP]
    assert not unlisted, "lazy imports from a later layer not in LAZY_UP (move the code, or list it with a " \
                         "reason):\n" + '\n'.join(unlisted)
    assert set(LAZY_UP) <= set(found), f"LAZY_UP lists imports that are gone: {sorted(set(LAZY_UP) - set(found))}"


def test_every_module_is_in_a_layer():
    modules = {module for module, *_ in _scan()}
    loose = sorted(m for m in modules if m != 'mindformers' and _layer(m) is None and m not in OLD_PATHS)
    assert not loose, f"modules outside DESIGN's layers: {loose}"


@pytest.mark.parametrize('old,new', sorted(OLD_PATHS.items()))
def test_old_paths_only_re_export(old, new):
    path = os.path.join(os.path.dirname(PACKAGE), *old.split('.')) + '.py'
    with open(path, encoding='utf-8') as f:
        body = ast.parse(f.read()).body
    statements = [node for node in body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    assert statements and all(isinstance(node, ast.ImportFrom) and node.module == new for node in statements)
    old_module, new_module = __import__(old, fromlist=['_']), __import__(new, fromlist=['_'])
    names = [alias.name for node in statements for alias in node.names]
    assert all(getattr(old_module, name) is getattr(new_module, name) for name in names)


def test_the_registry_loads_only_later_layers():
    """The registry (tools) imports the packages whose classes register themselves, by name, on its first lookup."""
    assert all(_layer(package) not in (None, 'tools') for package in register.LIBRARY_PACKAGES)


def test_tools_foundation_imports_only_tools():
    """tools/ outside its entry points is the foundation: it imports no other part of mindformers, even lazily
    (but for LAZY_UP)."""
    wrong = [f"{module} -> {target}" for module, _, target, _, _ in _scan()
             if _layer(module) == 'tools' and _layer(target) != 'tools' and (module, target) not in LAZY_UP
             and module not in OLD_PATHS]
    assert not wrong, wrong


def _run(code):
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(PACKAGE))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_import_mindformers_and_the_light_clis_load_no_mindspore():
    """`import mindformers` is lazy: the rank-table and msrun helpers (and any CLI's flag parsing) share the
    foundation's helpers without loading MindSpore."""
    assert _run("import sys, mindformers, mindformers.tools.hccl_tools, mindformers.tools.merge_hccl, "
                "mindformers.tools.msrun_worker, mindformers.tools.msrun_summary, mindformers.tools.file_io, "
                "mindformers.tools.utils, mindformers.parallel; print('mindspore' in sys.modules)") == ['False']


def test_public_names_resolve_on_first_use():
    out = _run("import mindformers, mindformers.pipeline as p\n"
               "from mindformers import *\n"
               "from mindformers.pipeline.pipeline import pipeline as function\n"
               "from mindformers.trainer import Trainer as T\n"
               "from mindformers.models.llama import LlamaForCausalLM as L\n"
               "print(p is function, mindformers.pipeline is function, Trainer is T, LlamaForCausalLM is L,\n"
               "      'GLMChatModel' in mindformers.__all__, hasattr(mindformers, 'NoSuchName'))")
    assert out == ['True', 'True', 'True', 'True', 'True', 'False']


def test_the_registry_loads_the_library_on_first_lookup_and_keeps_earlier_registrations():
    """A user's class registered under one of our names before the first lookup keeps its place, as it did when
    `import mindformers` registered everything first."""
    out = _run("from mindformers.tools.register import MindFormerRegister as R, MindFormerModuleType as T\n"
               "@R.register(T.CONFIG, alias='GPT2Config')\n"
               "class Mine: pass\n"
               "print(R.get_cls(T.CONFIG, 'GPT2Config') is Mine, R.get_cls(T.MODELS, 'LlamaForCausalLM').__name__,\n"
               "      R.is_exist(T.TRAINER, 'Trainer'), 'GPT2Tokenizer' in R.names(T.TOKENIZER))")
    assert out == ['True', 'LlamaForCausalLM', 'True', 'True']
