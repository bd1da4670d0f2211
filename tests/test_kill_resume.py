"""A run killed with SIGKILL at random moments, also in the middle of a checkpoint write, resumes from the newest
complete checkpoint and computes exactly the losses of an uninterrupted run."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = textwrap.dedent('''
    import json, os, sys, time
    sys.path.insert(0, {repo!r})
    import numpy as np
    import mindspore as ms
    import mindspore.dataset as ds
    from mindspore.train.callback import Callback
    from mindformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    import mindformers.tools.checkpoint as checkpoint_io

    out = sys.argv[1]
    killable = sys.argv[2:] != ['reference']  # the reference run is not killed: no waits for the test to kill in
    real_replace = os.replace

    def slow_replace(src, dst):
        # widen the window between "temporary file complete" and "renamed into place" so the test can kill there
        if '.partial.' in os.path.basename(src):
            open(os.path.join(out, 'saving'), 'w').close()
            time.sleep(0.3)
        real_replace(src, dst)

    if killable:
        checkpoint_io.os.replace = slow_replace

    class Progress(Callback):
        def on_train_step_end(self, run_context):
            state = run_context.original_args()
            with open(os.path.join(out, 'losses.jsonl'), 'a') as f:
                f.write(json.dumps([state.cur_step_num, state.loss]) + '\\n')
            if killable:
                time.sleep(0.05)

    ms.set_context(mode=0)
    ms.set_seed(0)
    rows = np.random.default_rng(0).integers(2, 64, size=(48, 17)).astype(np.int32)
    data = ds.NumpySlicesDataset({{'input_ids': rows}}, shuffle=True).batch(4, drop_remainder=True)
    model = GPT2LMHeadModel(GPT2Config(seq_length=16, vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
                                       hidden_dropout_rate=0.0, attention_dropout_rate=0.0,
                                       embedding_dropout_prob=0.0, eos_token_id=1, pad_token_id=0))
    args = TrainingArguments(output_dir=out, batch_size=4, num_train_epochs=3, learning_rate=5e-3, warmup_steps=3,
                             save_steps=1, save_total_limit=3, logging_steps=100)
    resume = os.path.isfile(os.path.join(out, 'checkpoint', 'rank_0', 'meta.json'))
    Trainer(task='text_generation', model=model, args=args, train_dataset=data,
            callbacks=[Progress()]).train(resume_training=resume)
''')


def losses_of(out):
    path = os.path.join(out, 'losses.jsonl')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith('\n')]


def start(driver, out, *args):
    return subprocess.Popen([sys.executable, driver, out, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path):
    driver = tmp_path / 'driver.py'
    driver.write_text(DRIVER.format(repo=REPO))
    reference_dir = str(tmp_path / 'reference')
    proc = start(str(driver), reference_dir, 'reference')
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    reference = {step: loss for step, loss in losses_of(reference_dir)}
    assert sorted(reference) == list(range(1, 37))

    out = str(tmp_path / 'killed')
    rng = random.Random(1234)
    kills = []
    for attempt in range(8):
        proc = start(str(driver), out)
        done_before = len(losses_of(out))
        marker = os.path.join(out, 'saving')
        if os.path.exists(marker):
            os.remove(marker)
        if attempt % 2 == 0:  # in the middle of writing a checkpoint
            hit = wait_for(lambda: os.path.exists(marker), proc)
            kind = 'during checkpoint write'
        else:  # a few steps into training, at a random moment
            target = done_before + rng.randint(2, 6)
            hit = wait_for(lambda: len(losses_of(out)) >= target, proc)
            if hit:
                time.sleep(rng.uniform(0, 0.06))
            kind = 'between steps'
        if not hit:
            break  # training finished before the kill
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append(kind)
    else:
        proc = start(str(driver), out)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    assert kills.count('during checkpoint write') >= 2 and len(kills) >= 4, kills

    seen = losses_of(out)
    assert {step for step, _ in seen} == set(range(1, 37))
    for step, loss in seen:  # steps redone after a kill give the same loss as the first time and as the reference
        assert abs(loss - reference[step]) <= 1e-6, (step, loss, reference[step])
    rank_dir = os.path.join(out, 'checkpoint', 'rank_0')
    assert not [f for f in os.listdir(rank_dir) if f.startswith('.')], os.listdir(rank_dir)  # no partial files left
