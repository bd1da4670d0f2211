"""Streamers deliver exactly the text generate() returns, as whole words, from the same thread or another."""
import queue
import threading

import numpy as np
import pytest

from mindformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
from mindformers.generation import TextIteratorStreamer, TextStreamer


@pytest.fixture(scope='module')
def setup():
    tokenizer = GPT2Tokenizer(vocab_file='assets/gpt2_tiny/vocab.json', merges_file='assets/gpt2_tiny/merges.txt',
                              add_bos_token=False, add_eos_token=False)  # prompts as the text, no BOS/EOS around
    config = GPT2Config(vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, seq_length=64,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    model.set_train(False)
    return tokenizer, model


PROMPT = 'First Citizen: Before we proceed'
OPTIONS = dict(max_new_tokens=30, do_sample=True, top_k=0, seed=3, eos_token_id=[], use_past=True)


def test_text_streamer_prints_what_generate_returns(setup, capsys):
    tokenizer, model = setup
    ids = tokenizer.encode(PROMPT)
    full = tokenizer.decode(model.generate([ids], **OPTIONS)[0])
    capsys.readouterr()
    model.generate([ids], streamer=TextStreamer(tokenizer), **OPTIONS)
    assert capsys.readouterr().out == full + '\n'
    model.generate([ids], streamer=TextStreamer(tokenizer, skip_prompt=True), **OPTIONS)
    assert capsys.readouterr().out == full[len(PROMPT):] + '\n'


class _Recorder(TextStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.pieces = []

    def on_text(self, text, stream_end=False):
        self.pieces.append(text)


def test_pieces_are_whole_words(setup):
    tokenizer, model = setup
    recorder = _Recorder(tokenizer)
    model.generate([tokenizer.encode(PROMPT)], streamer=recorder, **OPTIONS)
    assert len(recorder.pieces) > 3
    for piece in recorder.pieces[:-1]:  # everything before the final flush ends at a word boundary
        assert piece == '' or piece.endswith((' ', '\n'))


def test_skip_special_tokens(setup, capsys):
    tokenizer, _ = setup
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    streamer.put(np.array([tokenizer.encode('good night')]))
    streamer.put(np.array([tokenizer.eos_token_id]))
    streamer.end()
    assert capsys.readouterr().out == 'good night\n'


def test_iterator_streamer_from_another_thread(setup):
    tokenizer, model = setup
    ids = tokenizer.encode(PROMPT)
    full = tokenizer.decode(model.generate([ids], **OPTIONS)[0])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    worker = threading.Thread(target=model.generate, args=([ids],), kwargs=dict(streamer=streamer, **OPTIONS))
    worker.start()
    pieces = list(streamer)
    worker.join()
    assert ''.join(pieces) == full[len(PROMPT):]
    assert len(pieces) > 1


def test_iterator_streamer_times_out():
    streamer = TextIteratorStreamer(tokenizer=None, timeout=0.05)
    with pytest.raises(queue.Empty):
        next(streamer)


def test_a_batch_cannot_be_streamed(setup):
    tokenizer, model = setup
    with pytest.raises(ValueError, match='single prompt'):
        model.generate([[5, 6], [7]], streamer=TextStreamer(tokenizer), max_new_tokens=2)
    with pytest.raises(ValueError, match='one sequence'):
        TextStreamer(tokenizer).put(np.array([[1, 2], [3, 4]]))
