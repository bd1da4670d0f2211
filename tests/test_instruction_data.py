"""Instruction / conversation data -> prompt-masked MindRecord (instruction_to_mindrecord), and finetuning on it."""
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
import mindspore.dataset as ds

from mindformers import MindFormerConfig, Trainer
from mindformers.models.gpt2.gpt2_tokenizer import GPT2Tokenizer
from mindformers.tools.build import build_model
from mindformers.tools.dataset_preprocess import instruction_to_mindrecord as sft
from mindformers.tools.dataset_preprocess.instruction_to_mindrecord import (
    Conversation, PreprocessError, encode_conversation, encode_parts, iter_records, iter_sft_samples, main,
    parse_conversation, write_sft_mindrecord)
from helpers.cli import json_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, 'mindformers', 'assets')
ALPACA = os.path.join(ASSETS, 'instruction', 'alpaca_sample.json')
CONVERSATION = os.path.join(ASSETS, 'instruction', 'conversation_sample.json')
VOCAB, MERGES = (os.path.join(ASSETS, 'gpt2_tiny', name) for name in ('vocab.json', 'merges.txt'))
TINY_YAML = os.path.join(REPO, 'configs', 'gpt2', 'run_gpt2_tiny.yaml')
TOKENIZER = GPT2Tokenizer(vocab_file=VOCAB, merges_file=MERGES)
EOS = TOKENIZER.eos_token_id  # = bos = pad = 0 (<|endoftext|>)
SEQ = 256
TOKENIZER_ARGS = ['--tokenizer', 'GPT2Tokenizer', '--vocab_file', VOCAB, '--merges_file', MERGES]


def enc(text):
    return TOKENIZER.encode(text, add_special_tokens=False)


def convert(output, *extra, data=ALPACA, fmt='alpaca', template='alpaca', seq=SEQ, tokenizer=None):
    """Run the CLI in process; returns its exit code."""
    argv = ['--input', data, '--format', fmt, '--template', template, '--seq_length', str(seq),
            '--output_file', str(output), '--quiet'] + (tokenizer or TOKENIZER_ARGS) + list(extra)
    return main(argv)


def read(path):
    rows = list(ds.MindDataset(str(path), shuffle=False).create_dict_iterator(num_epochs=1, output_numpy=True))
    return np.stack([r['input_ids'] for r in rows]), np.stack([r['labels'] for r in rows])


def expected_row(pieces, width=SEQ + 1):
    """(input_ids, labels) from [(ids, trained)], padded with EOS ids and -100 labels."""
    ids = [i for piece, _ in pieces for i in piece]
    labels = [i if trained else -100 for piece, trained in pieces for i in piece]
    pad = width - len(ids)
    return np.array(ids + [EOS] * pad, np.int32), np.array(labels + [-100] * pad, np.int32)


# ----------------------------------------------------------------------------- masking, token by token
def test_alpaca_sample_masks_the_prompt_and_keeps_answer_and_eos(tmp_path, capsys):
    out = tmp_path / 'alpaca.mindrecord'
    assert convert(out) == 0
    printed = capsys.readouterr().out
    assert '\n  samples    12 of 257 tokens' in printed and '\n  trained ' in printed  # the report for people
    summary = json_result(printed)  # and for scripts
    assert (summary['outputs'], summary['samples'], summary['seq_length']) == ([str(out)], 12, SEQ)
    input_ids, labels = read(out)
    assert input_ids.shape == labels.shape == (12, SEQ + 1)
    assert input_ids.dtype == labels.dtype == np.int32

    # record 1 by hand: BOS, the Stanford prompt with input (masked), the answer and EOS (trained), padding
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate the "
              "sentence into French.\n\n### Input:\nThe cat sleeps on the warm stone.\n\n### Response:\n")
    answer = enc("Le chat dort sur la pierre chaude.")
    want_ids, want_labels = expected_row([([TOKENIZER.bos_token_id], False), (enc(prompt), False),
                                          (answer, True), ([EOS], True)])
    np.testing.assert_array_equal(input_ids[1], want_ids)
    np.testing.assert_array_equal(labels[1], want_labels)
    end = 1 + len(enc(prompt)) + len(answer)  # where EOS sits
    assert labels[1, end] == EOS and labels[1, end - 1] == answer[-1] and (labels[1, end + 1:] == -100).all()
    assert (input_ids[1, end + 1:] == EOS).all()  # padding with the tokenizer's pad (= EOS for GPT-2)

    # every record: the trained tokens are exactly its answer followed by EOS
    records = json.load(open(ALPACA, encoding='utf-8'))
    for row, record in zip(labels, records):
        assert row[0] == -100 and list(row[row != -100]) == enc(record['output']) + [EOS]


def test_two_turn_conversation_trains_every_answer(tmp_path):
    out = tmp_path / 'chat.mindrecord'
    assert convert(out, data=CONVERSATION, fmt='conversation', template='llama2_chat') == 0
    input_ids, labels = read(out)
    assert input_ids.shape == (6, SEQ + 1)
    bos = TOKENIZER.bos_token_id
    # conv-1 by hand: each turn BOS + "[INST] user [/INST]" masked, " answer " + EOS trained
    want_ids, want_labels = expected_row([
        ([bos], False), (enc("[INST] Hi! Can you recommend a book about the sea? [/INST]"), False),
        (enc(' Try "The Old Man and the Sea" by Ernest Hemingway. '), True), ([EOS], True),
        ([bos], False), (enc("[INST] Is it long? [/INST]"), False),
        (enc(" No, it is a short novel of about one hundred pages. "), True), ([EOS], True)])
    np.testing.assert_array_equal(input_ids[0], want_ids)
    np.testing.assert_array_equal(labels[0], want_labels)
    # conv-3: the system text goes into the first [INST] block and stays masked
    first_prompt = enc("[INST] <<SYS>>\nYou are a patient maths tutor.\n<</SYS>>\n\nWhat is 15 percent of 80? "
                       "[/INST]")
    assert list(input_ids[2, 1:1 + len(first_prompt)]) == first_prompt
    assert (labels[2, :1 + len(first_prompt)] == -100).all()
    # role/content messages (conv-4) read like from/value ones
    assert list(labels[3][labels[3] != -100]) == enc(" Spoon. ") + [EOS]


def test_glm2_template_uses_the_tokenizers_prefix_and_round_prompts():
    # a tokenizer that adds BOS on encode(add_special_tokens=True) (GPT-2's default, as MindFormers) stands in for
    # GLM2's [gMASK] sop prefix
    tokenizer = GPT2Tokenizer(vocab_file=VOCAB, merges_file=MERGES)
    conversation = parse_conversation(json.load(open(CONVERSATION, encoding='utf-8'))[0], 'conv')
    ids, trained = encode_conversation(conversation, 'glm2', tokenizer)
    a1 = 'Try "The Old Man and the Sea" by Ernest Hemingway.'
    a2 = 'No, it is a short novel of about one hundred pages.'
    pieces = [([TOKENIZER.bos_token_id], False),
              (enc("[Round 1]\n\n问：Hi! Can you recommend a book about the sea?\n\n答："), False), (enc(a1), True),
              (enc("\n\n[Round 2]\n\n问：Is it long?\n\n答："), False), (enc(a2), True), ([EOS], True)]
    assert ids == [i for piece, _ in pieces for i in piece]
    assert trained == [flag for piece, flag in pieces for _ in piece]
    # without special tokens on encode (HF's GPT-2) there is no prefix
    plain = GPT2Tokenizer(vocab_file=VOCAB, merges_file=MERGES, add_bos_token=False, add_eos_token=False)
    assert encode_conversation(conversation, 'glm2', plain)[0] == ids[1:]


def test_texts_are_tokenized_together_and_split_where_the_prompt_tokens_end():
    class MergingTokenizer:
        """Characters are tokens, except 'ab', which is one token."""
        def encode(self, text, add_special_tokens=False):
            out, i = [], 0
            while i < len(text):
                step = 2 if text.startswith('ab', i) else 1
                out.append(text[i:i + step])
                i += step
            return out
    ids, trained = encode_parts(MergingTokenizer(), [([7], False), ('xa', False), ('by', True), ([9], True)])
    # 'ab' spans the boundary: it starts in the prompt but only exists with the answer, so it is an answer token
    assert ids == [7, 'x', 'ab', 'y', 9] and trained == [False, False, True, True, True]


def test_templates_are_a_registry():
    assert {'alpaca', 'llama2_chat', 'glm2'} <= set(sft.TEMPLATES)

    @sft.register_template('plain_test')
    def plain(conversation, specials):
        return [(sft.user_text(q) + ' => ', False) if i % 2 == 0 else (a, True)
                for q, a in conversation.turns for i in range(2)] + [([specials.eos], True)]
    try:
        ids, trained = encode_conversation(Conversation('', [(('hi', ''), 'yo')]), 'plain_test', TOKENIZER)
        # the prompt's trailing space joins the answer's first token (' yo'), which is trained
        assert ids == enc('hi => yo') + [EOS] and enc('hi => yo') == enc('hi =>') + enc(' yo')
        assert trained == [False] * len(enc('hi =>')) + [True] * (len(enc(' yo')) + 1)
    finally:
        del sft.TEMPLATES['plain_test']


# ----------------------------------------------------------------------------- inputs and long samples
def test_json_lines_and_model_name_tokenizer_give_the_same_records(tmp_path):
    lines = tmp_path / 'alpaca.jsonl'
    lines.write_text('\n'.join(json.dumps(r, ensure_ascii=False) for r in json.load(open(ALPACA, encoding='utf-8')))
                     + '\n\n', encoding='utf-8')
    assert convert(tmp_path / 'a.mindrecord') == 0
    assert convert(tmp_path / 'b.mindrecord', data=str(lines), tokenizer=['--tokenizer', 'gpt2_tiny']) == 0
    for x, y in zip(read(tmp_path / 'a.mindrecord'), read(tmp_path / 'b.mindrecord')):
        np.testing.assert_array_equal(x, y)


def test_long_samples_are_truncated_or_dropped(tmp_path, capsys):
    records = [{'instruction': 'Say hi.', 'output': 'Hi there, friend.'},
               {'instruction': 'Count. ' * 10, 'output': 'one two three four five six seven eight'},
               {'instruction': 'Long prompt ' * 40, 'output': 'never seen'}]
    where = [(f'r{i}', r) for i, r in enumerate(records)]
    full = [encode_conversation(sft.parse_alpaca(r, 'r'), 'alpaca', TOKENIZER) for r in records]
    seq = len(full[1][0]) - 4  # record 1 loses the end of its answer, record 2 its whole answer
    assert len(full[0][0]) <= seq + 1 < len(full[1][0]) and sum(full[2][1][:seq + 1]) == 0
    stats = {}
    block, = iter_sft_samples(where, 'alpaca', TOKENIZER, seq, stats=stats)
    assert block['input_ids'].shape == (2, seq + 1)
    np.testing.assert_array_equal(block['input_ids'][1], full[1][0][:seq + 1])  # the prompt start is kept
    assert stats['samples'] == 2 and stats['truncated'] == 1 and stats['answer_cut'] == 1
    assert stats['trained_tokens'] == sum(full[0][1][1:]) + sum(full[1][1][1:seq + 1])
    stats = {}
    block, = iter_sft_samples(where, 'alpaca', TOKENIZER, seq, drop_long=True, stats=stats)
    assert len(block['labels']) == 1 and stats['too_long'] == 2 and stats['truncated'] == 0
    with pytest.raises(PreprocessError, match='no samples: 3 record'):
        list(iter_sft_samples(where, 'alpaca', TOKENIZER, 4))
    # the CLI reports the counts
    data = tmp_path / 'long.json'
    data.write_text(json.dumps(records), encoding='utf-8')
    assert convert(tmp_path / 'long.mindrecord', '--drop_long', data=str(data), seq=seq) == 0
    summary = json_result(capsys.readouterr().out)
    assert (summary['too_long'], summary['answer_cut'], summary['samples']) == (2, 0, 1)


# ----------------------------------------------------------------------------- bad input
ALPACA_OK = {'instruction': 'Say hi.', 'input': '', 'output': 'Hi.'}
CHAT_OK = {'conversations': [{'from': 'human', 'value': 'Hi'}, {'from': 'gpt', 'value': 'Hello!'}]}


def _chat(*messages, key='conversations'):
    return {key: [dict(m) for m in messages]}


BAD_RECORDS = [
    ('alpaca', {'instruction': 'x', 'input': ''}, "missing key 'output'"),
    ('alpaca', {'instruction': 'x', 'output': 3}, "'output' is int, expected a string"),
    ('alpaca', {'instruction': 'x', 'output': '  '}, "empty answer: nothing to train on ('output' is blank)"),
    ('alpaca', {'instruction': '', 'output': 'y'}, "empty instruction ('instruction' is blank)"),
    ('alpaca', {'instruction': 'x', 'input': ['a'], 'output': 'y'}, "'input' is list"),
    ('alpaca', ['x', 'y'], 'expected a JSON object, got list'),
    ('alpaca', CHAT_OK, "missing key 'instruction' (keys: 'conversations'); is this --format conversation?"),
    ('conversation', ALPACA_OK, "missing key 'conversations'"),
    ('conversation', {'conversations': 'Hi'}, "'conversations' is str, expected a list"),
    ('conversation', _chat({'from': 'human'}, {'from': 'gpt', 'value': 'a'}), "conversations[0]: missing key 'value'"),
    ('conversation', _chat({'from': 'robot', 'value': 'q'}), "conversations[0].from is 'robot'"),
    ('conversation', _chat({'from': 'human', 'value': 'q'}, {'from': 'gpt', 'value': ''}),
     "empty answer: nothing to train on ('conversations[1].value' is blank)"),
    ('conversation', _chat({'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': None}, key='messages'),
     "'messages[1].content' is NoneType"),
    ('conversation', _chat({'from': 'human', 'value': ' '}, {'from': 'gpt', 'value': 'a'}), 'empty user message'),
    ('conversation', _chat({'from': 'human', 'value': 'q'}), 'ends with a user message'),
    ('conversation', _chat({'from': 'human', 'value': 'q'}, {'from': 'human', 'value': 'q2'}),
     "conversations[1].from is 'human', expected an assistant message"),
    ('conversation', _chat({'from': 'gpt', 'value': 'a'}), "conversations[0].from is 'gpt', expected a user"),
    ('conversation', {'conversations': []}, 'has no user/assistant turn'),
]


@pytest.mark.parametrize('fmt,record,message', BAD_RECORDS)
def test_bad_records_name_file_line_record_and_key(tmp_path, capsys, fmt, record, message):
    good = ALPACA_OK if fmt == 'alpaca' else CHAT_OK
    data = tmp_path / 'data.json'
    data.write_text('[\n' + ',\n'.join(json.dumps(r) for r in (good, good, record)) + '\n]\n', encoding='utf-8')
    out = tmp_path / 'out.mindrecord'
    assert convert(out, data=str(data), fmt=fmt, template='alpaca') == 1  # bad data: exit 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('instruction_to_mindrecord: error: ')
    assert f"{data}:4: record 2: " in err and message in err, err
    assert os.listdir(tmp_path) == ['data.json']  # nothing written, no temporary left behind


BAD_FILES = [
    ('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]', ':2: record 1: bad JSON'),
    ('[{"instruction": "a", "output": "b"},\n]', ':2: record 1: bad JSON: Expecting value'),
    ('[{"instruction": "a", "output": "b"}\n {"instruction": "c", "output": "d"}]', ":2: expected ',' or ']' after "
                                                                                    "record 0"),
    ('[{"instruction": "a", "output": "b"}', ":1: expected ',' or ']' after record 0"),
    ('[{"instruction": "a", "output": "b"}]\n[]', ':2: unexpected text after the JSON array'),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", output: "d"}\n', ':2: record 1: bad JSON line'),
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n', ":3: record 1: missing key 'output'"),
    ('  \n', 'empty file'),
]


@pytest.mark.parametrize('text,message', BAD_FILES)
def test_malformed_json_is_reported_with_its_line(tmp_path, capsys, text, message):
    data = tmp_path / 'data.jsonl'
    data.write_text(text, encoding='utf-8')
    assert convert(tmp_path / 'out.mindrecord', data=str(data)) == 1
    err = capsys.readouterr().err
    assert f"error: {data}" in err and message in err, err
    assert os.listdir(tmp_path) == ['data.jsonl']


@pytest.mark.parametrize('args,message', [
    (['--seq_length', '0'], '--seq_length must be >= 1'),
    (['--output_file', 'out.db'], '--output_file must end with .mindrecord'),
    (['--tokenizer', 'NoSuchTokenizer'], "unknown tokenizer type 'NoSuchTokenizer'"),
    (['--input', os.path.join(ASSETS, 'corpus', 'tiny_shakespeare.txt')], 'expected a .json or .jsonl file'),
    (['--input', 'no/such/file.json'], 'input not found'),
    (['--pad_id', '-1'], '--pad_id -1 is not a token id of GPT2Tokenizer (ids 0 .. 511)'),
    (['--pad_id', '512'], '--pad_id 512 is not a token id of GPT2Tokenizer (ids 0 .. 511)'),
    (['--bogus', 'x'], 'instruction_to_mindrecord: error: unrecognized arguments: --bogus x'),
])
def test_bad_options_are_reported(tmp_path, capsys, args, message):
    argv = dict(zip(['--input', '--format', '--template', '--seq_length', '--output_file'] + TOKENIZER_ARGS[::2],
                    [ALPACA, 'alpaca', 'alpaca', '8', str(tmp_path / 'o.mindrecord')] + TOKENIZER_ARGS[1::2]))
    argv.update(zip(args[::2], args[1::2]))
    if argv['--tokenizer'] != 'GPT2Tokenizer':
        del argv['--vocab_file'], argv['--merges_file']
    try:
        code = main([item for pair in argv.items() for item in pair] + ['--quiet'])
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1, err
    assert not os.listdir(tmp_path)


def test_cli_entry_point_exits_1_on_bad_data(tmp_path):
    data = tmp_path / 'data.json'
    data.write_text('[{"instruction": "x"}]', encoding='utf-8')
    result = subprocess.run([sys.executable, '-m', 'mindformers.tools.dataset_preprocess.instruction_to_mindrecord',
                             '--input', str(data), '--format', 'alpaca', '--template', 'alpaca', '--seq_length', '8',
                             '--output_file', str(tmp_path / 'o.mindrecord'), '--tokenizer', 'gpt2_tiny'],
                            capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 1 and f"{data}:1: record 0: missing key 'output'" in result.stderr
    assert 'Warning' not in result.stderr  # e.g. runpy's "found in sys.modules after import of package"
    assert not (tmp_path / 'o.mindrecord').exists()


def test_output_is_atomic_and_not_overwritten_by_default(tmp_path, capsys):
    out = tmp_path / 'out.mindrecord'
    assert convert(out) == 0
    before = {p: (tmp_path / p).read_bytes() for p in ('out.mindrecord', 'out.mindrecord.db')}
    assert convert(out, data=CONVERSATION, fmt='conversation') == 2
    assert f'output already exists: {out} (pass --overwrite to replace it)' in capsys.readouterr().err
    # a failure while writing over it with --overwrite leaves the old output whole
    bad = tmp_path / 'bad.json'
    records = json.load(open(ALPACA, encoding='utf-8')) * 200 + [{'instruction': 'x'}]
    bad.write_text(json.dumps(records, ensure_ascii=False), encoding='utf-8')
    assert convert(out, '--overwrite', data=str(bad)) == 1
    assert f"{bad}:1: record 2400: missing key 'output'" in capsys.readouterr().err
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == ['bad.json', 'out.mindrecord', 'out.mindrecord.db']
    # with --overwrite a good input replaces it
    assert convert(out, '--overwrite', data=CONVERSATION, fmt='conversation') == 0
    assert read(out)[0].shape == (6, SEQ + 1)
    with pytest.raises(FileExistsError):
        write_sft_mindrecord(str(out), [], SEQ)


def test_iter_records_reports_lines_of_array_records(tmp_path):
    data = tmp_path / 'x.json'
    data.write_text('\ufeff[\n  {"a": 1},\n\n  {"b": [1,\n 2]}, {"c": 3}\n]\n', encoding='utf-8')
    assert [where for where, _ in iter_records([str(data)])] == [f'{data}:2: record 0', f'{data}:4: record 1',
                                                                 f'{data}:5: record 2']


# ----------------------------------------------------------------------------- reading it back
def test_instruction_dataset_batches_both_columns_and_explains_bad_data(tmp_path):
    from mindformers.dataset import InstructionDataset
    from mindformers.tools.build import build_dataset
    from mindformers.tools.dataset_preprocess.text_to_mindrecord import write_mindrecord
    assert convert(tmp_path / 'sft' / 'train.mindrecord', template='llama2_chat', seq=128) == 0
    config = {'data_loader': {'type': 'MindDataset', 'dataset_dir': str(tmp_path / 'sft'), 'shuffle': True},
              'batch_size': 4, 'seq_length': 128, 'seed': 3}
    dataset = build_dataset({'type': 'InstructionDataset', 'dataset_config': config})
    assert dataset.get_col_names() == ['input_ids', 'labels'] and dataset.get_dataset_size() == 3
    batch = next(dataset.create_dict_iterator(num_epochs=1, output_numpy=True))
    assert batch['input_ids'].shape == batch['labels'].shape == (4, 129) and batch['labels'].dtype == np.int32
    rows = {tuple(ids): labels for ids, labels in zip(*read(tmp_path / 'sft' / 'train.mindrecord'))}
    for ids, labels in zip(batch['input_ids'], batch['labels']):  # each row keeps its own labels
        np.testing.assert_array_equal(rows[tuple(ids)], labels)
    with pytest.raises(ValueError, match=r"seq_length 32 needs seq_length \+ 1 = 33"):
        InstructionDataset(dict(config, seq_length=32))
    with pytest.raises(ValueError, match="must include 'labels'"):
        InstructionDataset(dict(config, input_columns=['input_ids']))
    with pytest.raises(ValueError, match='unknown dataset_config key .eod_reset'):
        InstructionDataset(dict(config, eod_reset=True))
    write_mindrecord(str(tmp_path / 'lm' / 'train.mindrecord'), [np.zeros((4, 129), np.int32)], 128)
    with pytest.raises(ValueError, match=r"missing \['labels'\].*instruction_to_mindrecord"):
        InstructionDataset(dict(config, data_loader={'type': 'MindDataset', 'dataset_dir': str(tmp_path / 'lm')}))


# ----------------------------------------------------------------------------- finetuning on it
def _masked_ce(logits, input_ids, labels):
    """Mean cross-entropy over the targets labels[:, 1:] that are not -100 (numpy reference)."""
    targets = labels[:, 1:]
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    keep = targets != -100
    picked = np.take_along_axis(logp, np.where(keep, targets, 0)[..., None], -1)[..., 0]
    return -picked[keep].mean(), int(keep.sum())


def test_finetune_reads_labels_and_counts_only_answer_tokens(tmp_path):
    seq = 128
    data_dir = tmp_path / 'data'
    assert convert(data_dir / 'train.mindrecord', data=ALPACA, template='llama2_chat', seq=seq) == 0
    input_ids, labels = read(data_dir / 'train.mindrecord')
    dataset = {'data_loader': {'type': 'MindDataset', 'dataset_dir': str(data_dir), 'shuffle': False},
               'input_columns': ['input_ids', 'labels'], 'batch_size': 4, 'drop_remainder': True}
    config = MindFormerConfig(TINY_YAML)
    config.merge_from_dict({'output_dir': str(tmp_path / 'out'), 'runner_config.epochs': 1,
                            'runner_config.batch_size': 4, 'model.model_config.num_layers': 2,
                            'model.model_config.hidden_size': 64, 'callbacks': []})
    config['train_dataset'] = dict(dataset)
    config['eval_dataset'] = dict(dataset)
    config.merge_from_dict({'train_dataset_task.type': 'InstructionDataset',
                            'eval_dataset_task.type': 'InstructionDataset'})
    ms.set_seed(0)
    model = build_model(config.model)
    model.set_train(False)
    logits = model(ms.Tensor(input_ids[:4, :-1])).asnumpy()
    masked, count = _masked_ce(logits, input_ids[:4], labels[:4])
    everything, _ = _masked_ce(logits, input_ids[:4], input_ids[:4])
    assert 0 < count < 0.5 * 4 * seq and abs(masked - everything) > 0.01

    trainer = Trainer(args=config, model=model)
    state = trainer.finetune()
    assert len(state.losses) == 3 and np.isfinite(state.losses).all()
    # the first step's loss is the mean over the answer tokens of its batch only
    np.testing.assert_allclose(state.losses[0], masked, rtol=2e-4)
    # evaluation counts the trained tokens too
    result = trainer.evaluate()
    assert result['tokens'] == int((labels[:, 1:] != -100).sum()) and np.isfinite(result['loss'])


# ----------------------------------------------------------------------------- SentencePiece tokenizers
def _sentencepiece_conversation(tmp_path, module, name, asset, template):
    """(tokenizer, input_ids, labels) of the conversation sample converted with a SentencePiece tokenizer."""
    tokenizer_module = importlib.import_module(module)
    model_file = os.path.join(ASSETS, asset, 'tokenizer.model')
    out = tmp_path / f'{asset}.mindrecord'
    assert convert(out, data=CONVERSATION, fmt='conversation', template=template,
                   tokenizer=['--tokenizer', name, '--vocab_file', model_file]) == 0
    return (getattr(tokenizer_module, name)(model_file),) + read(out)


def _masked_runs(ids, labels):
    """[(ids of a run, trained)] of maximal runs with the same masking."""
    runs = []
    for token, label in zip(ids, labels):
        if not runs or runs[-1][1] != (label != -100):
            runs.append(([], label != -100))
        runs[-1][0].append(int(token))
    return runs


def test_llama2_chat_with_llama_tokenizer(tmp_path):
    tokenizer, input_ids, labels = _sentencepiece_conversation(
        tmp_path, 'mindformers.models.llama.llama_tokenizer', 'LlamaTokenizer', 'llama_tiny', 'llama2_chat')
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    # each turn as Meta encodes it: BOS + "[INST] user [/INST] answer " + EOS; the tokens of "[INST] user [/INST]"
    # alone are the masked part
    want = []
    for user, answer in (("Hi! Can you recommend a book about the sea?",
                          'Try "The Old Man and the Sea" by Ernest Hemingway.'),
                         ("Is it long?", "No, it is a short novel of about one hundred pages.")):
        prompt = tokenizer.encode(f"[INST] {user} [/INST]", add_special_tokens=False)
        whole = tokenizer.encode(f"[INST] {user} [/INST] {answer} ", add_special_tokens=False)
        assert whole[:len(prompt)] == prompt
        want += [([bos] + prompt, False), (whole[len(prompt):] + [eos], True)]
    n = sum(len(piece) for piece, _ in want)
    assert _masked_runs(input_ids[0, :n], labels[0, :n]) == want
    assert (input_ids[0, n:] == pad).all() and (labels[0, n:] == -100).all()


def test_glm2_with_chatglm2_tokenizer(tmp_path):
    tokenizer, input_ids, labels = _sentencepiece_conversation(
        tmp_path, 'mindformers.models.glm2.glm2_tokenizer', 'ChatGLM2Tokenizer', 'glm2_tiny', 'glm2')
    # conv-5: [gMASK] sop, then the whole [Round N] text tokenized at once, split where each prompt's tokens end
    texts = ["[Round 1]\n\n问：请用简短的中文回答。\n\n水的化学式是什么？\n\n答：", "H2O。",
             "\n\n[Round 2]\n\n问：那二氧化碳呢？\n\n答：", "CO2。"]
    whole = tokenizer.encode(''.join(texts), add_special_tokens=False)
    ends = [len(tokenizer.encode(''.join(texts[:k]), add_special_tokens=False)) for k in (1, 2, 3)] + [len(whole)]
    want = [(tokenizer.get_prefix_tokens() + whole[:ends[0]], False)] + [
        (whole[a:b] + ([tokenizer.eos_token_id] if k == 3 else []), k % 2 == 1)
        for k, (a, b) in enumerate(zip(ends, ends[1:]), start=1)]
    n = sum(len(piece) for piece, _ in want)
    assert _masked_runs(input_ids[4, :n], labels[4, :n]) == want
    assert (labels[4, n:] == -100).all()
