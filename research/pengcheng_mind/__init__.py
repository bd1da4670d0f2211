"""PengCheng.Mind 7B / mPengC.mind: config, model, tokenizer (weight conversion:
`research.pengcheng_mind.convert_pengcheng_mind`, `convert_weight.py --model pengcheng_mind`). Registered like the
families under `mindformers/models/`: the registry imports this package on its first lookup."""
from mindformers.tools.register import FamilySpec, register_family

from .pengcheng_mind_config import PengChengMindConfig
from .modeling_pengcheng_mind import PengChengMindForCausalLM
from .pengcheng_mind_tokenizer import PengChengMindTokenizer, PengChengMindProcessor

register_family(FamilySpec(
    name='pengcheng_mind', config=PengChengMindConfig, model=PengChengMindForCausalLM,
    tokenizer=PengChengMindTokenizer, processor=PengChengMindProcessor,
    converter=f'{__name__}.convert_pengcheng_mind', yaml_dirs=('research/pengcheng_mind',)))

__all__ = ['PengChengMindConfig', 'PengChengMindForCausalLM', 'PengChengMindTokenizer', 'PengChengMindProcessor']
