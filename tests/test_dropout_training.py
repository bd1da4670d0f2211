"""Two training steps of every family at its published dropout values (GPT-2 and PanGu-alpha 0.1 embedding,
attention and residual dropout; GLM's release 0.0 and, since its config takes them, 0.1; LLaMA, GLM2 and
PengCheng.Mind have none), with the fused CPU kernels on and off: the graph compiles, the loss is finite and the
weights move. A dropout layer in training once broke the compile of the fused residual path (it called the
cell itself, which graph mode cannot), as did fp16 parameters computed in fp32 (the residual fallback)."""
import numpy as np
import pytest
import mindspore as ms
import mindspore.dataset as ds

from mindformers import (Trainer, TrainingArguments, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                         GLMConfig, GLMForPreTraining, ChatGLM2Config, ChatGLM2ForConditionalGeneration,
                         PanguAlphaConfig, PanguAlphaHeadModel)
from research.pengcheng_mind import PengChengMindConfig, PengChengMindForCausalLM
from helpers.kernel_checks import cpu_kernels_set

VOCAB, SEQ, HIDDEN = 128, 8, 32
DROPOUT = dict(embedding_dropout_prob=0.1, hidden_dropout_rate=0.1, attention_dropout_rate=0.1)
SIZES = dict(hidden_size=HIDDEN, num_layers=2, seq_length=SEQ)
FAMILIES = {
    'gpt2': lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, num_heads=4, **SIZES)),  # defaults: 0.1
    'pangualpha': lambda: PanguAlphaHeadModel(PanguAlphaConfig(vocab_size=VOCAB, num_heads=4, **SIZES)),  # 0.1
    'glm': lambda: GLMForPreTraining(GLMConfig(vocab_size=VOCAB, num_heads=4, inner_hidden_size=64, bos_token_id=120,
                                               eos_token_id=121, mask_token_id=122, gmask_token_id=123,
                                               pad_token_id=3, **SIZES)),  # release: 0.0
    'glm_dropout': lambda: GLMForPreTraining(GLMConfig(vocab_size=VOCAB, num_heads=4, inner_hidden_size=64,
                                                       bos_token_id=120, eos_token_id=121, mask_token_id=122,
                                                       gmask_token_id=123, pad_token_id=3, **DROPOUT, **SIZES)),
    'llama': lambda: LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, num_heads=4, n_kv_heads=2, intermediate_size=64,
                                                  **SIZES)),
    'glm2': lambda: ChatGLM2ForConditionalGeneration(ChatGLM2Config(
        padded_vocab_size=VOCAB, num_attention_heads=4, multi_query_group_num=2, kv_channels=8, ffn_hidden_size=64,
        **SIZES)),
    'gpt2_fp16_params': lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, num_heads=4, param_init_type='float16',
                                                           **{key: 0.0 for key in DROPOUT}, **SIZES)),
    'pengcheng_mind': lambda: PengChengMindForCausalLM(PengChengMindConfig(vocab_size=VOCAB, num_heads=4,
                                                                           ffn_hidden_size=64, **SIZES)),
}


def _two_steps(tmp_path, family):
    ms.set_seed(0)
    model = FAMILIES[family]()
    before = {p.name: p.asnumpy().copy() for p in model.trainable_params()}
    rows = np.random.default_rng(0).integers(10, 100, (4, SEQ + 1)).astype(np.int32)
    data = ds.NumpySlicesDataset({'input_ids': rows}, shuffle=False).batch(2, drop_remainder=True)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, learning_rate=1e-3, warmup_steps=0,
                             save_strategy='no')
    state = Trainer(model=model, args=args, train_dataset=data).train()
    assert len(state.losses) == 2 and np.isfinite(state.losses).all(), state.losses
    moved = [name for name, value in before.items()
             if not np.array_equal(value, model.parameters_dict()[name].asnumpy())]
    assert len(moved) == len(before), sorted(set(before) - set(moved))


def test_tutorial_gpt2_trains_with_default_dropout(tmp_path, kernel_mode):
    """The tutorial's GPT2Config (dropout 0.1 by default) through Trainer."""
    _two_steps(tmp_path, 'gpt2')


def test_fp16_parameters_train_through_the_fused_residual_add(tmp_path):
    with cpu_kernels_set(True):
        _two_steps(tmp_path, 'gpt2_fp16_params')


@pytest.mark.slow
@pytest.mark.parametrize('family', sorted(set(FAMILIES) - {'gpt2', 'gpt2_fp16_params'}))
def test_family_trains_two_steps_with_published_dropout(tmp_path, kernel_mode, family):
    _two_steps(tmp_path, family)
