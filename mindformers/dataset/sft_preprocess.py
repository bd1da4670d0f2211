"""Instruction and conversation records -> prompt-masked samples for supervised finetuning (what
`python -m mindformers.tools.dataset_preprocess.instruction_to_mindrecord` writes as MindRecord; its help describes
the formats).

`parse_alpaca` / `parse_conversation` read one record into a `Conversation`; a template (`TEMPLATES`, add one with
`register_template`) turns it into prompt and answer parts; `encode_conversation` tokenizes the parts (consecutive
texts together, as the model will see them) into (ids, trained mask); `iter_sft_samples` yields blocks of samples,
each `input_ids` and `labels` of seq_length + 1 int32 tokens, answers and their EOS trained, prompts and padding
labelled -100."""
from typing import NamedTuple

import numpy as np

from mindformers.dataset.chat_templates import alpaca_prompt, glm2_chat_prompt, llama2_chat_turns
from mindformers.dataset.preprocess import (IGNORE_INDEX, PreprocessError, UsageError, _require, _text, check_token_ids,
                                            pack_sample, tokenizer_vocab_size)

COLUMNS = ('input_ids', 'labels')
FORMATS = ('alpaca', 'conversation')
ROLES = {'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant', 'chatgpt': 'assistant',
         'bot': 'assistant', 'model': 'assistant', 'system': 'system'}


class Conversation(NamedTuple):
    """One training example: an optional system text and the (query, answer) turns, a query being
    (instruction, input) — conversation messages have an empty input."""
    system: str
    turns: list


# ----------------------------------------------------------------------------- records
def parse_alpaca(record, where):
    """Conversation of an Alpaca record {instruction, input (optional), output}."""
    hint = '; is this --format conversation?' if isinstance(record, dict) and (
        'conversations' in record or 'messages' in record) else ''
    instruction = _text(_require(record, 'instruction', where, hint), where, 'instruction', 'empty instruction')
    output = _text(_require(record, 'output', where, hint), where, 'output', 'empty answer: nothing to train on')
    input_text = record.get('input')
    input_text = '' if input_text is None else _text(input_text, where, 'input')
    return Conversation('', [((instruction, input_text), output)])


def parse_conversation(record, where):
    """Conversation of a {conversations|messages: [{from, value} | {role, content}, ...]} record."""
    key = 'messages' if isinstance(record, dict) and 'messages' in record and 'conversations' not in record \
        else 'conversations'
    hint = '; is this --format alpaca?' if isinstance(record, dict) and 'instruction' in record else ''
    messages = _require(record, key, where, hint)
    if not isinstance(messages, list):
        raise PreprocessError(f"{where}: {key!r} is {type(messages).__name__}, expected a list of messages")
    system, turns, query = '', [], None
    for i, message in enumerate(messages):
        at = f"{key}[{i}]"
        role_key, text_key = ('role', 'content') if isinstance(message, dict) and 'role' in message \
            else ('from', 'value')
        speaker = _require(message, role_key, f"{where}: {at}")
        role = ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise PreprocessError(f"{where}: {at}.{role_key} is {speaker!r}, expected one of "
                                  f"{', '.join(map(repr, ROLES))}")
        what = {'user': 'empty user message', 'assistant': 'empty answer: nothing to train on'}.get(role)
        value = _text(_require(message, text_key, f"{where}: {at}"), where, f"{at}.{text_key}", what)
        expected = 'user' if query is None else 'assistant'
        if role == 'system' and i == 0:
            system = value
        elif role != expected:
            raise PreprocessError(f"{where}: {at}.{role_key} is {speaker!r}, expected a{'n' * (expected[0] == 'a')} "
                                  f"{expected} message (user and assistant turns alternate, the system message "
                                  f"only comes first)")
        elif role == 'user':
            query = (value, '')
        else:
            turns.append((query, value))
            query = None
    if query is not None or not turns:
        raise PreprocessError(f"{where}: {key!r} " + ('ends with a user message: its answer is missing'
                                                       if query is not None else 'has no user/assistant turn'))
    return Conversation(system, turns)


PARSERS = {'alpaca': parse_alpaca, 'conversation': parse_conversation}


# ----------------------------------------------------------------------------- templates
class Specials(NamedTuple):
    """The tokenizer's special ids a template may use: `bos` ([bos_token_id] or []), `eos` (an id), `prefix` (what
    the tokenizer puts before every text with add_special_tokens=True, e.g. GLM2's [gMASK] sop)."""
    bos: list
    eos: int
    prefix: list


TEMPLATES = {}


def register_template(name):
    """Decorator making `fn(conversation, specials) -> parts` the template `name`. A part is `(text, trained)` or
    `(list of token ids, trained)`; consecutive texts are tokenized as one text (see `encode_parts`)."""
    def register(fn):
        TEMPLATES[name] = fn
        return fn
    return register


def user_text(query):
    """A query (instruction, input) as one user message: the input, if any, follows the instruction."""
    instruction, input_text = query
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def _system_first(conversation):
    """Turns with the system text (if any) put before the first user message, for formats without a system slot."""
    turns = [(user_text(query), answer) for query, answer in conversation.turns]
    if conversation.system:
        turns[0] = (f"{conversation.system}\n\n{turns[0][0]}", turns[0][1])
    return turns


@register_template('alpaca')
def alpaca_template(conversation, specials):
    """BOS, then per turn the Alpaca prompt (masked), the answer and EOS."""
    parts = [(specials.bos, False)]
    for index, ((instruction, input_text), answer) in enumerate(conversation.turns):
        prompt = alpaca_prompt(instruction, input_text)
        if index == 0 and conversation.system:
            prompt = f"{conversation.system}\n\n{prompt}"
        parts += [(prompt, False), (answer, True), ([specials.eos], True)]
    return parts


@register_template('llama2_chat')
def llama2_chat_template(conversation, specials):
    """Per turn: BOS, `[INST] user [/INST]` (masked), ` answer ` and EOS — each turn tokenized on its own."""
    turns = [(user_text(query), answer) for query, answer in conversation.turns]
    texts = llama2_chat_turns('', turns, conversation.system)[:-1]
    parts = []
    for index, text in enumerate(texts):
        prompt = llama2_chat_turns(turns[index][0], turns[:index], conversation.system)[-1]
        parts += [(specials.bos, False), (prompt, False), (_after(text, prompt), True), ([specials.eos], True)]
    return parts


@register_template('glm2')
def glm2_template(conversation, specials):
    """The tokenizer's prefix ([gMASK] sop), the `[Round N]` prompts (masked) with every answer trained, EOS."""
    turns = _system_first(conversation)
    parts, done = [(specials.prefix, False)], ''
    for index, (query, answer) in enumerate(turns):
        prompt = glm2_chat_prompt(query, turns[:index])
        parts += [(_after(prompt, done), False), (answer, True)]
        done = prompt + answer
    return parts + [([specials.eos], True)]


def _after(text, start):
    if not text.startswith(start):
        raise AssertionError(f"template text {text[:60]!r}... does not continue {start[:60]!r}...")
    return text[len(start):]


# ----------------------------------------------------------------------------- tokenizing
def tokenizer_specials(tokenizer):
    """`Specials` of a tokenizer, found with `encode(text, add_special_tokens=...)` and its special token ids."""
    name = type(tokenizer).__name__
    eos = getattr(tokenizer, 'eos_token_id', None)
    if eos is None:
        raise PreprocessError(f"{name} has no eos_token_id: every answer ends with EOS")
    bos = getattr(tokenizer, 'bos_token_id', None)
    probe = 'Hello'
    plain = list(tokenizer.encode(probe, add_special_tokens=False))
    full = list(tokenizer.encode(probe, add_special_tokens=True))
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
    if not plain or not starts:
        raise PreprocessError(f"{name}: cannot tell which special tokens encode() adds ({probe!r} -> {plain} "
                              f"without and {full} with them)")
    return Specials([] if bos is None else [int(bos)], int(eos), [int(i) for i in full[:starts[0]]])


def _common_prefix(a, b):
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _encode_texts(tokenizer, texts, ids, trained):
    """Tokenize the concatenation of `texts` [(text, trained)] once; each token belongs to the text where it
    starts (a token spanning two texts belongs to the second): part k ends where the tokens of texts[:k+1]
    alone stop matching the whole."""
    whole = ''.join(text for text, _ in texts)
    tokens = list(tokenizer.encode(whole, add_special_tokens=False))
    start = chars = 0
    for k, (text, flag) in enumerate(texts):
        chars += len(text)
        end = len(tokens) if k == len(texts) - 1 else max(start, _common_prefix(
            tokenizer.encode(whole[:chars], add_special_tokens=False), tokens))
        ids += tokens[start:end]
        trained += [flag] * (end - start)
        start = end


def encode_parts(tokenizer, parts):
    """(token ids, trained flags) of template parts: ids are taken as they are, runs of consecutive texts are
    tokenized together (`add_special_tokens=False`) and split where each text's tokens end."""
    ids, trained, texts = [], [], []
    for piece, flag in list(parts) + [([], False)]:
        if isinstance(piece, str):
            if texts and texts[-1][1] == flag:
                texts[-1] = (texts[-1][0] + piece, flag)
            elif piece:
                texts.append((piece, flag))
            continue
        if texts:
            _encode_texts(tokenizer, texts, ids, trained)
            texts = []
        ids += [int(i) for i in piece]
        trained += [bool(flag)] * len(piece)
    return ids, trained


def encode_conversation(conversation, template, tokenizer, specials=None):
    """(token ids, trained flags) of one Conversation under template `template` (a name in TEMPLATES)."""
    if template not in TEMPLATES:
        raise PreprocessError(f"unknown template {template!r}; known: {', '.join(sorted(TEMPLATES))}")
    specials = tokenizer_specials(tokenizer) if specials is None else specials
    return encode_parts(tokenizer, TEMPLATES[template](conversation, specials))


def iter_sft_samples(records, template, tokenizer, seq_length, fmt='alpaca', pad_id=None, drop_long=False,
                     stats=None, block_samples=1024):
    """Parse (where, record) pairs as `fmt`, encode them with `template` and yield blocks
    {'input_ids': int32 [n, seq_length + 1], 'labels': ...}. `stats` (a dict, if given) is kept up to date:
    records, samples, truncated, too_long, answer_cut, tokens (without padding), trained_tokens, longest,
    seq_length. Raises PreprocessError naming the record at fault, or when no sample is left."""
    seq_length = int(seq_length)
    if seq_length < 1:
        raise PreprocessError(f"seq_length must be >= 1, got {seq_length}")
    if fmt not in PARSERS:
        raise PreprocessError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if template not in TEMPLATES:
        raise PreprocessError(f"unknown template {template!r}; known: {', '.join(sorted(TEMPLATES))}")
    specials = tokenizer_specials(tokenizer)
    if pad_id is None:
        pad_id = getattr(tokenizer, 'pad_token_id', None)
    pad_id = specials.eos if pad_id is None else int(pad_id)
    vocab_size = tokenizer_vocab_size(tokenizer)
    if pad_id < 0 or (vocab_size is not None and pad_id >= vocab_size):
        raise UsageError(f"--pad_id {pad_id} is not a token id of {type(tokenizer).__name__} (ids 0 .. "
                         f"{'' if vocab_size is None else vocab_size - 1})")
    stats = {} if stats is None else stats
    stats.update(records=0, samples=0, truncated=0, too_long=0, answer_cut=0, tokens=0, trained_tokens=0,
                 longest=0, seq_length=seq_length)
    block = {column: [] for column in COLUMNS}
    for where, record in records:
        conversation = PARSERS[fmt](record, where)
        ids, trained = encode_conversation(conversation, template, tokenizer, specials)
        check_token_ids(ids, vocab_size, where, f"{type(tokenizer).__name__} or the template")
        stats['records'] += 1
        stats['longest'] = max(stats['longest'], len(ids))
        status, input_ids, labels = pack_sample(ids, trained, seq_length, pad_id, drop_long)
        if input_ids is None:
            stats[status] += 1
            continue
        stats['truncated'] += status == 'truncated'
        stats['samples'] += 1
        stats['tokens'] += min(len(ids), seq_length + 1)
        stats['trained_tokens'] += int((labels[1:] != IGNORE_INDEX).sum())
        block['input_ids'].append(input_ids)
        block['labels'].append(labels)
        if len(block['labels']) >= block_samples:
            yield {column: np.stack(rows) for column, rows in block.items()}
            block = {column: [] for column in COLUMNS}
    if block['labels']:
        yield {column: np.stack(rows) for column, rows in block.items()}
    if stats['samples'] == 0:
        raise PreprocessError(f"no samples: {stats['records']} record(s) read, {stats['too_long']} longer than "
                              f"seq_length + 1 = {seq_length + 1} tokens dropped, {stats['answer_cut']} with no "
                              f"answer token left after truncation (longest: {stats['longest']} tokens)")
