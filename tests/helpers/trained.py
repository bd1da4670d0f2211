"""Tiny models of every family trained for a few hundred steps on the bundled corpus (so their weights are not
random and accuracy comparisons mean something), with held-out text and prompts from the same corpus.

Each model trains in a fresh interpreter (`python -m helpers.trained FAMILY DIRECTORY`), so its weights do not depend
on what earlier tests did in the test process: MindSpore state they leave behind changed the trained weights, and
with them the int8 errors the tolerances are measured on. It trains compiled (GRAPH_MODE, as the tests run): the same
weights on every run, in about a seventh of PyNative's time."""
import json
import os
import subprocess
import sys

import numpy as np

from helpers.cli import tool_env
from helpers.tiny import ASSETS, tiny_yaml

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CORPUS = os.path.join(ASSETS, 'corpus', 'tiny_shakespeare.txt')
TRAIN_CHARS, HELD_OUT_CHARS = 60000, 6000
TRAIN_LENGTH, BATCH, LEARNING_RATE = 64, 8, 3e-3
# the accuracy tests (perplexity, 20 greedy continuations) run on GPT-2 and LLaMA: they train longer
STEPS = {'gpt2': 300, 'llama': 300}
OTHER_STEPS = 120

# small models (every matrix input a multiple of 32, as block32 needs), seq_length 128: prompt + 64 new tokens
SIZES = {
    'gpt2': {'hidden_size': 64, 'num_layers': 2, 'num_heads': 4},
    'llama': {'hidden_size': 64, 'num_layers': 2, 'num_heads': 4, 'n_kv_heads': 2, 'intermediate_size': 192},
    'glm': {'hidden_size': 64, 'num_layers': 2, 'num_heads': 4, 'inner_hidden_size': 256},
    'glm2': {'hidden_size': 64, 'num_layers': 2, 'num_attention_heads': 4, 'kv_channels': 16,
             'multi_query_group_num': 2, 'ffn_hidden_size': 192},
    'pangualpha': {'hidden_size': 64, 'num_layers': 3, 'num_heads': 4, 'ffn_hidden_size': 256},
    'pengcheng_mind': {'hidden_size': 64, 'num_layers': 2, 'num_heads': 4, 'ffn_hidden_size': 192},
}


class TrainedTiny:
    """A family's tiny model trained on the corpus, saved with its tokenizer in the model directory `path` (fp32
    weights: `checkpoint`); `model(**config_overrides)` loads it. `held_out`: ids [rows, TRAIN_LENGTH + 1] of text
    it never saw; `prompts(n)`: id lists of held-out lines, as the family's prompts are made."""

    def __init__(self, family, directory, in_this_process=False):
        from mindformers.models.auto import AutoTokenizer
        self.family = family
        self.path = os.path.join(directory, f'{family}_fp32')
        self.checkpoint = os.path.join(self.path, 'model.safetensors')
        self.tokenizer = AutoTokenizer.from_pretrained(tiny_yaml(family))
        with open(CORPUS, encoding='utf-8') as f:
            text = f.read()
        self.train_ids = self._stream(text[:TRAIN_CHARS])
        self.held_out_text = text[-HELD_OUT_CHARS:]
        held = self._stream(self.held_out_text)
        rows = len(held) // (TRAIN_LENGTH + 1)
        self.held_out = self._rows(held[:rows * (TRAIN_LENGTH + 1)].reshape(rows, TRAIN_LENGTH + 1))
        self.losses = self._train() if in_this_process else self._train_in_a_fresh_process(directory)

    def model(self, **overrides):
        from mindformers.models.auto import AutoModel
        model = AutoModel.from_pretrained(self.path, **overrides)
        model.set_train(False)
        return model

    def _stream(self, text):
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False), np.int32)

    def _rows(self, rows):
        """GLM reads its blank and block from [gMASK] <sop>: its rows start with them, so every token that follows
        is in the causal block."""
        if self.family != 'glm':
            return rows
        from mindformers.models.auto import AutoConfig
        config = AutoConfig.from_pretrained(tiny_yaml('glm'))
        head = np.array([config.gmask_token_id, config.bos_token_id], np.int32)
        return np.concatenate([np.broadcast_to(head, (len(rows), 2)), rows[:, :-2]], axis=1)

    def prompts(self, count, words=4):
        """`count` prompts: the first `words` words of held-out lines, encoded as the family encodes a prompt."""
        lines = [line for line in self.held_out_text.splitlines() if len(line.split()) > words][:count]
        texts = [' '.join(line.split()[:words]) for line in lines]
        if self.family == 'glm':
            return [self._rows(np.asarray([self._stream(t)], np.int32))[0].tolist() for t in texts]
        return [self.tokenizer.encode_prompt(text) for text in texts]

    def _train_in_a_fresh_process(self, directory):
        """Train and save in a new interpreter; returns its losses."""
        proc = subprocess.run([sys.executable, '-m', 'helpers.trained', self.family, directory], cwd=TESTS,
                              env=tool_env(), capture_output=True, text=True, timeout=1800, check=False)
        assert proc.returncode == 0, f"training the tiny {self.family} failed:\n{proc.stderr[-3000:]}"
        with open(os.path.join(self.path, 'losses.json'), encoding='utf-8') as f:
            return json.load(f)

    def _train(self):
        import mindspore as ms
        from mindspore import nn
        from mindformers.models.auto import AutoModel
        ms.set_seed(0)
        model = AutoModel.from_config(tiny_yaml(self.family), **SIZES[self.family])
        model.set_train(True)
        optimizer = nn.AdamWeightDecay(model.trainable_params(), learning_rate=LEARNING_RATE)
        step = nn.TrainOneStepCell(model, optimizer)
        step.set_train(True)
        rng = np.random.default_rng(0)
        starts = rng.integers(0, len(self.train_ids) - TRAIN_LENGTH - 1, size=(STEPS.get(self.family, OTHER_STEPS), BATCH))
        losses = []
        for batch in starts:
            rows = np.stack([self.train_ids[s:s + TRAIN_LENGTH + 1] for s in batch])
            losses.append(float(step(ms.Tensor(self._rows(rows))).asnumpy()))
        model.save_pretrained(self.path)
        self.tokenizer.save_pretrained(self.path)
        with open(os.path.join(self.path, 'losses.json'), 'w', encoding='utf-8') as f:
            json.dump(losses, f)
        return losses


_TRAINED = {}


def trained_tiny(family, directory):
    """The family's `TrainedTiny` (trained once per process, its checkpoint in `directory`)."""
    if family not in _TRAINED:
        _TRAINED[family] = TrainedTiny(family, directory)
    return _TRAINED[family]


if __name__ == '__main__':
    import mindspore as ms
    ms.set_context(mode=0)
    ms.set_device('CPU')
    TrainedTiny(*sys.argv[1:3], in_this_process=True)
