"""Registry, build_*, MindFormerConfig: inheritance, overrides and every error message."""
import textwrap

import pytest

from mindformers.tools.build import build_module, build_model, build_callback, build_loss
from mindformers.tools.register import (MindFormerRegister, MindFormerModuleType, MindFormerConfig, ConfigError,
                                        parse_value)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding='utf-8')
    return str(path)


def test_custom_class_registered_in_user_code_builds_from_yaml(tmp_path, clean_registry):
    @MindFormerRegister.register(MindFormerModuleType.CALLBACK, alias='MyUserCallback')
    class MyCallback:
        def __init__(self, every=1, tag=''):
            self.every, self.tag = every, tag

    path = write(tmp_path, 'run.yaml', """
        callbacks:
          - type: MyUserCallback
            every: 7
            tag: hello
    """)
    config = MindFormerConfig(path)
    cb = build_callback(config.callbacks[0])
    assert isinstance(cb, MyCallback) and cb.every == 7 and cb.tag == 'hello'
    # default_args override the config's keys
    assert build_callback(config.callbacks[0], default_args={'every': 3}).every == 3
    # and by class name
    assert MindFormerRegister.get_instance(MindFormerModuleType.CALLBACK, 'MyUserCallback', every=2).every == 2


def test_mindspore_builtins_reachable_by_name():
    import mindspore as ms
    from mindspore import nn
    assert MindFormerRegister.get_cls(MindFormerModuleType.OPTIMIZER, 'Momentum') is nn.Momentum
    assert MindFormerRegister.get_cls(MindFormerModuleType.LR, 'CosineDecayLR') is nn.CosineDecayLR
    assert MindFormerRegister.get_cls(MindFormerModuleType.DATASET_LOADER, 'MindDataset') is ms.dataset.MindDataset
    assert MindFormerRegister.get_cls(MindFormerModuleType.CALLBACK, 'LossMonitor') is ms.train.LossMonitor
    loss = build_loss({'type': 'MSELoss'})
    assert isinstance(loss, nn.MSELoss)


def test_unknown_type_names_yaml_path_and_close_names():
    with pytest.raises(ValueError) as err:
        build_module({'type': 'GPT2LMHeadMdel'}, MindFormerModuleType.MODELS, where='model.arch')
    message = str(err.value)
    assert "'model.arch.type'" in message and 'GPT2LMHeadModel' in message


def test_model_section_errors_name_the_path():
    with pytest.raises(ValueError, match=r"model\.model_config\.type"):
        build_model({'model_config': {'type': 'NoSuchConfig'}, 'arch': {'type': 'GPT2LMHeadModel'}})
    with pytest.raises(KeyError, match='arch'):
        build_model({'model_config': {'type': 'GPT2Config'}})


def test_wrong_constructor_argument_names_the_class():
    with pytest.raises(TypeError, match='MFLossMonitor'):
        build_callback({'type': 'MFLossMonitor', 'no_such_arg': 1}, where='callbacks[0]')


def test_base_config_inheritance_relative_paths_and_deep_merge(tmp_path):
    (tmp_path / 'base').mkdir()
    write(tmp_path, 'base/root.yaml', """
        model:
          model_config: {type: GPT2Config, hidden_size: 64, num_layers: 2}
        runner_config: {epochs: 1, batch_size: 2}
        callbacks: [{type: MFLossMonitor}]
    """)
    write(tmp_path, 'base/mid.yaml', """
        base_config: root.yaml
        runner_config: {epochs: 3}
    """)
    child = write(tmp_path, 'child.yaml', """
        base_config: [base/mid.yaml]
        model:
          model_config: {num_layers: 4}
    """)
    config = MindFormerConfig(child)
    assert config.model.model_config.hidden_size == 64
    assert config.model.model_config.num_layers == 4
    assert config.runner_config.epochs == 3 and config.runner_config.batch_size == 2
    assert 'base_config' not in config


def test_missing_base_and_cycle(tmp_path):
    bad = write(tmp_path, 'a.yaml', "base_config: nope.yaml\n")
    with pytest.raises(ConfigError, match='nope.yaml'):
        MindFormerConfig(bad)
    write(tmp_path, 'x.yaml', "base_config: y.yaml\n")
    y = write(tmp_path, 'y.yaml', "base_config: x.yaml\n")
    with pytest.raises(ConfigError, match='cycle'):
        MindFormerConfig(y)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, 'broken.yaml', "a: 1\nb:\n  c: [1, 2\nd: 3\n")
    with pytest.raises(ConfigError) as err:
        MindFormerConfig(path)
    assert 'broken.yaml:' in str(err.value) and 'YAML syntax error' in str(err.value)


def test_safe_loader_refuses_python_objects(tmp_path):
    path = write(tmp_path, 'evil.yaml', "a: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError):
        MindFormerConfig(path)


def test_merge_from_dict_and_attribute_access():
    config = MindFormerConfig({'a': {'b': 1, 'c': {'d': 2}}})
    config.merge_from_dict({'a.c.e': 3, 'a.b': 5, 'new.key': [1, 2]})
    assert config.a.b == 5 and config.a.c.d == 2 and config.a.c.e == 3 and config.new.key == [1, 2]
    with pytest.raises(AttributeError, match="a.c.x"):
        _ = config.a.c.x
    config.a.f = {'g': 1}
    assert config.a.f.g == 1 and isinstance(config.a.f, MindFormerConfig)


def test_parse_value():
    assert parse_value('1') == 1 and parse_value('1e-4') == 1e-4 and parse_value('True') is True
    assert parse_value('[1, 2]') == [1, 2] and parse_value('abc') == 'abc' and parse_value('none') is None


def test_config_deepcopy_and_save_round_trip(tmp_path):
    import copy
    config = MindFormerConfig({'a': {'b': [1, {'c': 2}]}})
    clone = copy.deepcopy(config)
    clone.a.b[1].c = 9
    assert config.a.b[1].c == 2
    path = str(tmp_path / 'out.yaml')
    config.save(path)
    assert MindFormerConfig(path) == config


def test_a_mapping_of_another_type_replaces_instead_of_merging():
    from mindformers.tools.register import deep_merge
    base = {'loader': {'type': 'TextCorpusDataset', 'files': ['a.txt'], 'split': 'train', 'shuffle': True}}
    assert deep_merge(base, {'loader': {'type': 'MindDataset', 'dataset_dir': 'd'}}) == \
        {'loader': {'type': 'MindDataset', 'dataset_dir': 'd'}}
    assert deep_merge(base, {'loader': {'type': 'TextCorpusDataset', 'split': 'eval'}})['loader'] == \
        {'type': 'TextCorpusDataset', 'files': ['a.txt'], 'split': 'eval', 'shuffle': True}
    assert deep_merge(base, {'loader': {'shuffle': False}})['loader']['files'] == ['a.txt']


def test_clean_registry_restores_the_tables_in_place():
    """tests/helpers/registry.py: what a test registers or replaces is undone, new sections go, the table objects
    stay the same, and MindSpore's own classes stay registered."""
    import mindspore as ms
    from helpers.registry import registry_restored
    table = MindFormerRegister.registry
    metrics = table.setdefault(MindFormerModuleType.METRIC, {})
    original_ppl = MindFormerRegister.get_cls(MindFormerModuleType.METRIC, 'PerplexityMetric')
    with registry_restored() as register:
        @register.register(MindFormerModuleType.METRIC, alias='PerplexityMetric')
        class Replacement:
            pass

        register.register_cls(Replacement, 'a_new_section', alias='Only')
        assert register.get_cls(MindFormerModuleType.METRIC, 'PerplexityMetric') is Replacement
    assert MindFormerRegister.registry is table and table[MindFormerModuleType.METRIC] is metrics
    assert MindFormerRegister.get_cls(MindFormerModuleType.METRIC, 'PerplexityMetric') is original_ppl
    assert not MindFormerRegister.is_exist('a_new_section')
    assert MindFormerRegister.get_cls(MindFormerModuleType.METRIC, 'Accuracy') is ms.train.Accuracy
