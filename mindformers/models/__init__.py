"""Models: base classes, auto classes and one folder per family."""
from .base_config import BaseConfig
from .base_model import BaseModel, CausalLMModel
from .base_tokenizer import BaseTokenizer
from .base_processor import BaseProcessor
from .gpt2 import GPT2Config, GPT2Model, GPT2LMHeadModel, GPT2Tokenizer, GPT2TokenizerFast, GPT2Processor
from . import llama, glm2
from .llama import *  # noqa: F401,F403
from .glm2 import *  # noqa: F401,F403
from .glm import *  # noqa: F401,F403
from .pangualpha import *  # noqa: F401,F403
