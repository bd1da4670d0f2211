"""The tiny configs, tokenizers and data every family ships for tests and tutorials (configs/<family>/*_tiny.yaml,
mindformers/assets/<family>_tiny/, mindformers/assets/instruction/)."""
import os

from helpers import REPO

FAMILIES = ('gpt2', 'llama', 'glm', 'glm2', 'pangualpha', 'pengcheng_mind')
ASSETS = os.path.join(REPO, 'mindformers', 'assets')
INSTRUCTIONS = os.path.join(ASSETS, 'instruction')


def tiny_yaml(family, kind='run'):
    """The path of `<kind>_<family>_tiny.yaml` (kind 'run' or 'finetune'); PengCheng.Mind's is under research/."""
    folder = os.path.join('research', family) if family == 'pengcheng_mind' else os.path.join('configs', family)
    return os.path.join(REPO, folder, f'{kind}_{family}_tiny.yaml')


def tiny_asset(family, name):
    """A file of the family's tiny tokenizer, e.g. tiny_asset('gpt2', 'vocab.json') (PengCheng.Mind's tiny config
    uses LLaMA's)."""
    return os.path.join(ASSETS, f"{'llama' if family == 'pengcheng_mind' else family}_tiny", name)
