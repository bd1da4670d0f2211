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


def spread(options):
    """{family: the options a test runs on it}: all of them on GPT-2 (the most fused CPU-kernel paths), one on each
    other family in turn, so every family and every option is covered (for options whose code is family-blind)."""
    options = sorted(options)
    return {family: options if family == 'gpt2' else [options[i % len(options)]] for i, family in enumerate(FAMILIES)}


def tiny_asset(family, name):
    """A file of the family's tiny tokenizer, e.g. tiny_asset('gpt2', 'vocab.json') (PengCheng.Mind's tiny config
    uses LLaMA's)."""
    return os.path.join(ASSETS, f"{'llama' if family == 'pengcheng_mind' else family}_tiny", name)


def tiny_gpt2(seed=0, seq_length=16, **kwargs):
    """A 2-layer GPT-2 (hidden 32, 2 heads, vocabulary 64, no dropout, eos 1, pad 0) with weights drawn under
    `seed`; `kwargs` set other config fields (e.g. pet_config)."""
    import mindspore as ms
    from mindformers import GPT2Config, GPT2LMHeadModel
    ms.set_seed(seed)
    config = GPT2Config(**{'seq_length': seq_length, 'vocab_size': 64, 'hidden_size': 32, 'num_layers': 2,
                           'num_heads': 2, 'hidden_dropout_rate': 0.0, 'attention_dropout_rate': 0.0,
                           'embedding_dropout_prob': 0.0, 'eos_token_id': 1, 'pad_token_id': 0, 'bos_token_id': 1,
                           **kwargs})
    return GPT2LMHeadModel(config)


def counting_dataset(batch_size, num_samples=64, seq_length=16, seed=0):
    """Learnable data for `tiny_gpt2`: each row of seq_length + 1 ids counts upward mod 62 from a random start
    (ids 2..63), in batches of `batch_size`."""
    import numpy as np
    import mindspore.dataset as ds
    starts = np.random.default_rng(seed).integers(0, 62, size=num_samples)
    rows = ((starts[:, None] + np.arange(seq_length + 1)[None, :]) % 62 + 2).astype(np.int32)
    return ds.NumpySlicesDataset({'input_ids': rows}, shuffle=False).batch(batch_size, drop_remainder=True)


def tiny_sft_data(family, data, fmt, template, out_dir):
    """The bundled instruction file `data` (under mindformers/assets/instruction/, format `fmt`) as prompt-masked
    MindRecord for `family`'s tiny tokenizer (seq_length 128, `template`) in `out_dir`/train.mindrecord, written by
    instruction_to_mindrecord in this process (its command line is tested in test_instruction_data.py)."""
    from mindformers.tools.dataset_preprocess.instruction_to_mindrecord import main
    code = main(['--input', os.path.join(INSTRUCTIONS, data), '--format', fmt, '--template', template, '--tokenizer',
                 f'{family}_tiny', '--seq_length', '128', '--output_file', os.path.join(out_dir, 'train.mindrecord'),
                 '--quiet'])
    assert code == 0, f"instruction_to_mindrecord exited {code}"
    return out_dir
