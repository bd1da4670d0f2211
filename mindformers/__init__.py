"""mindformers: a MindSpore-native suite for large transformer language models."""
__version__ = '0.1.0'

from mindformers.tools.register import MindFormerRegister, MindFormerModuleType, MindFormerConfig
from mindformers.tools.build import (build_module, build_trainer, build_pipeline, build_processor, build_tokenizer,
                                     build_dataset, build_dataset_loader, build_model, build_model_config,
                                     build_modules, build_loss, build_callback, build_wrapper, build_metric,
                                     build_tools)
from mindformers.core import (init_context, ContextConfig, ParallelContextConfig, ParallelConfig, RecomputeConfig,
                              build_parallel_config, build_lr, build_optim, CrossEntropyLoss, PerplexityMetric,
                              ADGENMetric, MFLossMonitor, CheckpointMonitor, CheckpointMointor, AdamWeightDecay,
                              ClipGradNorm)
from mindformers.dataset import CausalLanguageModelDataset, KeyWordGenDataset, ADGenDataLoader
from mindformers.models import (BaseConfig, BaseModel, CausalLMModel, BaseTokenizer, BaseProcessor, GPT2Config,
                                GPT2Model, GPT2LMHeadModel, GPT2Tokenizer, GPT2TokenizerFast, GPT2Processor)
from mindformers.models.llama import *  # noqa: F401,F403  (LlamaConfig, LlamaForCausalLM, LlamaTokenizer, ...)
from mindformers.models.glm2 import *  # noqa: F401,F403  (ChatGLM2Config, ChatGLM2ForConditionalGeneration, ...)
from mindformers.models.pangualpha import *  # noqa: F401,F403  (PanguAlphaConfig, PanguAlphaHeadModel, ...)
from mindformers.models.glm import *  # noqa: F401,F403  (GLMConfig, GLMForPreTraining, GLMChatModel, ...)
from mindformers.models.auto import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer
from mindformers.generation import (GeneratorMixin, GenerationConfig, DecodingSession, BaseStreamer, TextStreamer,
                                    TextIteratorStreamer)
from mindformers.wrapper import MFTrainOneStepCell
from mindformers.trainer import Trainer, TrainingArguments
from mindformers.pipeline import pipeline, BasePipeline, TextGenerationPipeline

__all__ = [name for name in dir() if not name.startswith('_')]
