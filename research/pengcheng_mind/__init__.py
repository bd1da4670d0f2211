"""PengCheng.Mind 7B / mPengC.mind: config, model, tokenizer (weight conversion:
`research.pengcheng_mind.convert_pengcheng_mind`, `convert_weight.py --model pengcheng_mind`). Registered like the
families under `mindformers/models/`: the registry imports this package on its first lookup."""
from .pengcheng_mind_config import PengChengMindConfig
from .modeling_pengcheng_mind import PengChengMindForCausalLM
from .pengcheng_mind_tokenizer import PengChengMindTokenizer, PengChengMindProcessor

__all__ = ['PengChengMindConfig', 'PengChengMindForCausalLM', 'PengChengMindTokenizer', 'PengChengMindProcessor']
