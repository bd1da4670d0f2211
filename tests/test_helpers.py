"""The shared test helpers (tests/helpers/): test modules import helpers, never each other or conftest; the CLI
runner reads the JSON summary a tool prints; the tiny configs the helpers name exist."""
import ast
import os

import pytest

from helpers.cli import command, json_result, tool_env
from helpers.tiny import FAMILIES, tiny_asset, tiny_yaml

TESTS = os.path.dirname(os.path.abspath(__file__))


def _imported_modules(path):
    tree = ast.parse(open(path, encoding='utf-8').read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_no_test_module_imports_another_or_conftest():
    offenders = [(name, module) for name in sorted(os.listdir(TESTS)) if name.endswith('.py')
                 for module in _imported_modules(os.path.join(TESTS, name))
                 if module.split('.')[0].startswith('test_') or module.split('.')[0] == 'conftest']
    assert not offenders, f"import these from tests/helpers/ instead: {offenders}"


def test_json_result_is_the_last_json_object_line():
    stdout = 'wrote x\n{"a": 1}\n  documents 3\n{not json\n{"b": [1, 2]}\ntrailing text\n'
    assert json_result(stdout) == {'b': [1, 2]}
    with pytest.raises(AssertionError, match='no JSON summary line'):
        json_result('plain\n{broken\n')


def test_command_runs_scripts_by_path_and_modules_with_dash_m():
    script, module = command('run_mindformer.py', '--epochs', 2), command('mindformers.tools.export_strategy', b'\xff')
    assert script[1:] == [os.path.join(os.path.dirname(TESTS), 'run_mindformer.py'), '--epochs', '2']
    assert module[1:] == ['-m', 'mindformers.tools.export_strategy', b'\xff']
    assert tool_env()['PYTHONPATH'].split(os.pathsep)[0] == os.path.dirname(TESTS)


@pytest.mark.parametrize('family', FAMILIES)
def test_every_family_has_the_tiny_files_the_helpers_name(family):
    assert os.path.isfile(tiny_yaml(family))
    if family != 'gpt2':
        assert os.path.isfile(tiny_yaml(family, 'finetune'))
    assets = os.path.dirname(tiny_asset(family, 'x'))
    assert os.path.isdir(assets) and os.listdir(assets)
