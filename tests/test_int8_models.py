"""Weight-only int8 on every family, measured on tiny models trained on the bundled corpus (`helpers.trained`): logits
near fp32, held-out perplexity within +1 %, greedy 64-token continuations equal to fp32's, the KV cache equal to
recomputation, quantize-on-load, the ahead-of-time checkpoint (about 4x smaller, loaded without float weights),
merged LoRA, pipeline / serving / run_mindformer.py flags. The quantizer itself is tested against NumPy in
test_int8_kernels.py."""
import json
import os

import numpy as np
import pytest
import mindspore as ms

from helpers.tiny import FAMILIES, tiny_gpt2, tiny_yaml
from helpers.trained import trained_tiny
from mindformers.models.auto import AutoModel
from mindformers.modules.layers import Embedding, Linear, TiedLMHead
from mindformers.quantization import Int8Embedding, Int8Linear, Int8TiedLMHead, quantization_of, quantize_model

# |int8 logit - fp32 logit| <= LOGIT_TOLERANCE * (the largest |fp32 logit| of the batch): the worst single logit.
# Measured on the tiny models as helpers.trained trains them (compiled, 2026-12-07): GPT-2 block32 1.6 % (3.2 % with
# the embeddings int8 too), channel 0.7 % (1.3 %); LLaMA block32 1.8 % (4.9 %), channel 3.8 % (9.5 %, a combination
# no test asserts); the 99.9th percentile over the held-out text is 0.3-0.6 %. Other trainings of the same models
# (PyNative, or in the test process) gave up to 5.4 %: the worst logit moves with the weights, so the bound leaves
# that room. Accuracy proper is the perplexity, top-1 agreement and greedy tests below.
LOGIT_TOLERANCE = {'block32': 0.06, 'channel': 0.06}
GREEDY = dict(do_sample=False, eos_token_id=[])
# GPT-2 (tied head) and LLaMA (untied) every time; the other families train their own model: slow
EVERY_FAMILY = [family if family in ('gpt2', 'llama') else pytest.param(family, marks=pytest.mark.slow)
                for family in FAMILIES]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp('trained')
    return lambda family: trained_tiny(family, str(directory))


@pytest.fixture(scope='module')
def models(trained):
    """(fp32 model, int8 model) of a family: the fp32 model built once per family (its compiled graphs serve every
    scheme), the int8 model once per (family, scheme)."""
    fp32, int8 = {}, {}

    def get(family, scheme='block32'):
        tiny = trained(family)
        if family not in fp32:
            fp32[family] = tiny.model()
        if (family, scheme) not in int8:
            int8[family, scheme] = tiny.model(quantization='int8', quantization_config={'scheme': scheme})
        return fp32[family], int8[family, scheme]

    return get


def _logits(model, ids):
    out = model(ms.Tensor(np.asarray(ids, np.int32)))
    return (out[0] if isinstance(out, tuple) else out).asnumpy().astype(np.float64)


def _perplexity(model, rows):
    logits = _logits(model, rows[:, :-1])
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, rows[:, 1:, None].astype(np.int64), -1)
    return float(np.exp(-picked.mean()))


def _float_matrices(model):
    """Names of the float parameters of 2 or more dimensions."""
    return sorted(p.name for p in model.get_parameters() if len(p.shape) >= 2 and p.dtype != ms.int8
                  and not p.name.endswith('weight_scale'))


@pytest.mark.parametrize('family', EVERY_FAMILY)
def test_the_trained_models_learned_something(trained, family):
    tiny = trained(family)
    uniform = np.log(tiny.tokenizer.vocab_size)  # the loss of random weights
    assert np.mean(tiny.losses[-20:]) < uniform - 1.0, tiny.losses[::20]


@pytest.mark.parametrize('family', EVERY_FAMILY)
def test_every_linear_and_the_output_head_become_int8(models, family):
    fp32, int8 = models(family)
    assert quantization_of(int8) == {'scheme': 'block32', 'embeddings': False}
    linears = [path for path, cell in fp32.cells_and_names() if type(cell) is Linear]
    converted = dict(int8.cells_and_names())
    assert linears and all(type(converted[path]) is Int8Linear for path in linears)
    assert all(converted[path].weight.dtype == ms.int8 and converted[path].weight_scale.dtype == ms.float16
               for path in linears)
    tied = [path for path, cell in fp32.cells_and_names() if isinstance(cell, TiedLMHead)]
    assert all(isinstance(converted[path], Int8TiedLMHead) for path in tied)
    assert (family in ('gpt2', 'pangualpha', 'pengcheng_mind')) == bool(tied)
    # what stays float: the embedding tables (embeddings=False) and nothing else of two dimensions
    tables = {cell.weight.name for _, cell in fp32.cells_and_names() if isinstance(cell, Embedding)}
    assert set(_float_matrices(int8)) == tables


@pytest.mark.parametrize('family', EVERY_FAMILY)
def test_int8_logits_are_within_tolerance_of_fp32(trained, models, family):
    fp32, int8 = models(family)
    rows = trained(family).held_out[:4, :-1]
    expected, got = _logits(fp32, rows), _logits(int8, rows)
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert 0 < error <= LOGIT_TOLERANCE['block32'], error
    assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.97


@pytest.mark.parametrize('family', EVERY_FAMILY)
def test_cached_int8_greedy_equals_int8_recomputation(trained, models, family):
    _, int8 = models(family)
    prompts = trained(family).prompts(3)
    cached = int8.generate(prompts, use_past=True, max_new_tokens=16, **GREEDY)
    assert cached == int8.generate(prompts, use_past=False, max_new_tokens=16, **GREEDY)
    assert cached[1] == int8.generate(prompts[1:2], use_past=True, max_new_tokens=16, **GREEDY)[0]  # batching


@pytest.mark.slow
@pytest.mark.parametrize('family, scheme', [('gpt2', 'block32'), ('llama', 'block32'), ('gpt2', 'channel')])
def test_held_out_perplexity_within_one_percent_of_fp32(trained, models, family, scheme):
    fp32, int8 = models(family, scheme)
    rows = trained(family).held_out
    base, quantized = _perplexity(fp32, rows), _perplexity(int8, rows)
    assert base < 0.5 * trained(family).tokenizer.vocab_size  # a model that learned, far from uniform
    assert quantized <= 1.01 * base, (base, quantized)
    # the next token int8 ranks first is fp32's at >= 99 % of the held-out positions (measured 99.6-99.7 %)
    agreement = (_logits(int8, rows[:, :-1]).argmax(-1) == _logits(fp32, rows[:, :-1]).argmax(-1)).mean()
    assert agreement >= 0.99, agreement
    error = np.abs(_logits(int8, rows[:2, :-1]) - _logits(fp32, rows[:2, :-1]))
    assert error.max() <= LOGIT_TOLERANCE[scheme] * np.abs(_logits(fp32, rows[:2, :-1])).max()


@pytest.mark.slow
@pytest.mark.parametrize('family', ['gpt2', 'llama'])
def test_greedy_64_tokens_equal_fp32_on_most_of_20_prompts(trained, models, family):
    fp32, int8 = models(family)
    prompts = trained(family).prompts(20)
    assert len(prompts) == 20
    expected = fp32.generate(prompts, use_past=True, max_new_tokens=64, **GREEDY)
    got = int8.generate(prompts, use_past=True, max_new_tokens=64, **GREEDY)
    same = sum(a == b for a, b in zip(expected, got))
    # one near-tie makes a continuation differ from there on, so this counts whole continuations loosely: measured
    # 19/20 (GPT-2) and 20/20 (LLaMA; 15/20 as PyNative trained it, the others diverging at tokens 5-32); a broken
    # int8 path gives next to none.
    # The per-position agreement is in the perplexity test.
    assert same >= 12, f"{same}/20 continuations equal"
    assert len({tuple(row[-64:]) for row in expected}) >= 5  # the prompts lead to different continuations


def _quantize_cli(*args):
    from mindformers.tools.quantize import main
    return main([str(a) for a in args])


@pytest.mark.parametrize('family, source', [('gpt2', 'directory'), ('llama', 'load_checkpoint')])
def test_quantized_checkpoint_is_4x_smaller_and_loads_without_float_weights(trained, models, family, source,
                                                                           tmp_path, capsys):
    tiny = trained(family)
    fp32, _ = models(family)
    out = tmp_path / 'int8'
    weights = ['--load_checkpoint', tiny.checkpoint] if source == 'load_checkpoint' else []
    assert _quantize_cli('--model', tiny.path, *weights, '--output_dir', out, '--embeddings') == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fp32_size, size = os.path.getsize(tiny.checkpoint), os.path.getsize(out / 'model.safetensors')
    assert summary['bytes'] == size and summary['tokenizer'] and 0.97 < summary['float32_bytes'] / fp32_size <= 1
    # block32 stores 8.5 bits a weight (32 / 8.5 = 3.76x); the tiny GPT-2 keeps its position table (6 % of
    # its weights) float, a 7B model's float rest is well under 1 %
    assert fp32_size / size >= (3.0 if family == 'gpt2' else 3.5), (fp32_size, size)
    loaded = AutoModel.from_pretrained(str(out))
    loaded.set_train(False)
    # GPT-2 adds its position table whole (no lookup): that table stays float
    assert _float_matrices(loaded) == (['backbone.embed_positions.weight'] if family == 'gpt2' else [])
    assert any(isinstance(cell, Int8Embedding) for _, cell in loaded.cells_and_names())
    on_load = tiny.model(quantization='int8', quantization_config={'embeddings': True})
    rows = tiny.held_out[:2, :-1]
    got, expected = _logits(loaded, rows), _logits(fp32, rows)
    np.testing.assert_array_equal(got, _logits(on_load, rows))
    assert np.abs(got - expected).max() <= LOGIT_TOLERANCE['block32'] * np.abs(expected).max()
    assert _quantize_cli('--model', tiny.path, '--output_dir', out) == 2
    assert 'already exists' in capsys.readouterr().err and os.path.getsize(out / 'model.safetensors') == size


def test_quantize_cli_refuses_a_source_without_weights(tmp_path, capsys):
    assert _quantize_cli('--model', 'gpt2_tiny', '--output_dir', tmp_path / 'out') == 2
    assert 'names no weights' in capsys.readouterr().err and not (tmp_path / 'out').exists()


def _lora_gpt2():
    model = tiny_gpt2(seed=1, pet_config={'pet_type': 'lora', 'lora_rank': 4, 'lora_alpha': 8,
                                          'target_modules': ['qkv_proj']})
    for param in model.get_parameters():
        if 'lora_b' in param.name:  # a LoRA that changes the model
            param.set_data(ms.Tensor(np.full(param.shape, 0.05, np.float32)))
    model.set_train(False)
    return model


def test_lora_is_merged_before_quantizing_and_refused_after():
    from mindformers.pet import apply_pet
    ids = np.arange(2, 14, dtype=np.int32).reshape(2, 6)
    merged = _lora_gpt2().merge_pet()
    merged_logits = _logits(merged, ids)
    expected = _logits(quantize_model(merged), ids)
    model = quantize_model(_lora_gpt2())
    assert model.pet_config is None and quantization_of(model) is not None
    np.testing.assert_array_equal(_logits(model, ids), expected)
    assert 0 < np.abs(expected - merged_logits).max() < LOGIT_TOLERANCE['block32'] * np.abs(merged_logits).max()
    with pytest.raises(ValueError, match='weight-only int8: PET needs its float weights'):
        apply_pet(model, {'pet_type': 'lora', 'lora_rank': 2})


def test_pipeline_quantizes_a_named_source_or_an_instance(trained, models):
    from mindformers import pipeline
    tiny = trained('gpt2')
    _, int8 = models('gpt2')
    prompt = tiny.prompts(1)[0]
    expected = tiny.tokenizer.decode(int8.generate([prompt], max_new_tokens=8, **GREEDY)[0],
                                     skip_special_tokens=True)
    text = tiny.tokenizer.decode(prompt, skip_special_tokens=True)
    built = pipeline('text_generation', model=tiny.path, quantization='int8', max_new_tokens=8, **GREEDY)
    assert quantization_of(built.model) == {'scheme': 'block32', 'embeddings': False}
    assert built(text)[0]['text_generation_text'] == [expected]
    instance = pipeline('text_generation', model=tiny.model(), tokenizer=tiny.tokenizer, quantization='int8',
                        max_new_tokens=8, **GREEDY)
    assert instance(text)[0]['text_generation_text'] == [expected]
    with pytest.raises(ValueError, match=r"pipeline\(\)\.quantization must be one of int8"):
        pipeline('text_generation', model=tiny.path, quantization='int4')


def test_the_server_decodes_int8_requests_together_as_alone(trained, models):
    import threading
    from mindformers.serving.cli import build_parser, start_engine
    from mindformers.serving.engine import SamplingParams
    tiny = trained('llama')
    _, int8 = models('llama')
    args = build_parser().parse_args(['--model', tiny.path, '--quantization', 'int8', '--slots', '2'])
    engine, _, _, _ = start_engine(tiny.path, args, 'tiny')
    try:
        assert quantization_of(engine.model) is not None
        prompts = tiny.prompts(2)
        events, done = {0: [], 1: []}, [threading.Event(), threading.Event()]

        def collect(index):
            def on_event(event):
                events[index].append(event)
                if event.finish_reason is not None:
                    done[index].set()
            return on_event

        for index, prompt in enumerate(prompts):
            engine.submit(prompt, SamplingParams(max_tokens=12, temperature=0), collect(index))
        assert all(d.wait(120) for d in done)
        for index, prompt in enumerate(prompts):
            expected = int8.generate([prompt], max_new_tokens=12, do_sample=False)[0][len(prompt):]
            streamed = ''.join(e.text for e in events[index])
            assert len(events[index]) > 2 and streamed == tiny.tokenizer.decode(expected, skip_special_tokens=True)
    finally:
        engine.shutdown()


def test_run_mindformer_refuses_quantized_training(capsys):
    import run_mindformer
    assert run_mindformer.main(['--config', tiny_yaml('gpt2'), '--run_mode', 'train', '--quantization', 'int8']) == 2
    assert 'is for inference' in capsys.readouterr().err


@pytest.mark.slow
def test_run_mindformer_predicts_with_quantization_int8(trained, models, capsys):
    import run_mindformer
    from helpers.trained import SIZES
    tiny = trained('gpt2')
    _, int8 = models('gpt2')
    prompt = tiny.prompts(1)[0]
    text = tiny.tokenizer.decode(prompt, skip_special_tokens=True)
    sizes = [item for key, value in SIZES['gpt2'].items() for item in (f'--model.model_config.{key}', str(value))]
    assert run_mindformer.main(['--config', tiny_yaml('gpt2'), '--run_mode', 'predict', '--quantization', 'int8',
                                '--load_checkpoint', tiny.checkpoint, '--predict_data', text,
                                '--generation.max_new_tokens', '8', *sizes]) == 0
    expected = tiny.tokenizer.decode(int8.generate([prompt], max_new_tokens=8, do_sample=False)[0],
                                     skip_special_tokens=True)
    assert capsys.readouterr().out.split('\n' + '-' * 40 + '\n')[0] == expected


@pytest.mark.parametrize('scheme', ['block32', 'channel'])
def test_the_int8_kernel_and_the_mindspore_op_fallback_agree(scheme):
    from helpers.kernel_checks import cpu_kernels_set
    ids = np.arange(2, 26, dtype=np.int32).reshape(2, 12)
    logits, kernels = {}, {}
    for enabled in (True, False):
        with cpu_kernels_set(enabled):
            model = quantize_model(tiny_gpt2(seed=2), scheme=scheme, embeddings=True)
            model.set_train(False)
            kernels[enabled] = {type(c.int8_kernel).__name__ for _, c in model.cells_and_names()
                                if isinstance(c, Int8Linear)}
            logits[enabled] = _logits(model, ids)
            decode = model.generate(ids[:, :5].tolist(), max_new_tokens=4, use_past=True, **GREEDY)  # 1-row steps
            assert decode == model.generate(ids[:, :5].tolist(), max_new_tokens=4, use_past=False, **GREEDY)
    assert kernels == {True: {'FusedInt8Linear'}, False: {'NoneType'}}
    np.testing.assert_allclose(logits[True], logits[False], rtol=0, atol=1e-5 * np.abs(logits[False]).max())


def test_quantize_cli_merges_a_lora_adapter_before_quantizing(trained, tmp_path, capsys):
    tiny = trained('gpt2')
    lora = tiny.model(pet_config={'pet_type': 'lora', 'lora_rank': 4, 'lora_alpha': 8, 'target_modules': ['qkv_proj']})
    for param in lora.get_parameters():
        if 'lora_b' in param.name:
            param.set_data(ms.Tensor(np.full(param.shape, 0.02, np.float32)))
    lora.save_peft_adapter(str(tmp_path / 'adapter'))
    rows = tiny.held_out[:2, :-1]
    expected = _logits(quantize_model(lora), rows)
    assert _quantize_cli('--model', tiny.path, '--pet_checkpoint', tmp_path / 'adapter', '--output_dir',
                         tmp_path / 'int8') == 0
    capsys.readouterr()
    loaded = AutoModel.from_pretrained(str(tmp_path / 'int8'))
    loaded.set_train(False)
    assert loaded.pet_config is None
    np.testing.assert_array_equal(_logits(loaded, rows), expected)
    assert np.abs(expected - _logits(tiny.model(), rows)).max() > 0.01  # the LoRA changed the model


def test_quantize_model_records_int8_on_a_copy_of_the_config():
    model = tiny_gpt2(seed=0)
    shared = model.config
    quantize_model(model, scheme='channel')
    assert shared.quantization is None and shared.quantization_config is None  # other models built from it stay float
    assert (model.config.quantization, model.config.quantization_config) == ('int8', {'scheme': 'channel',
                                                                                      'embeddings': False})
    with pytest.raises(ValueError, match="already int8 with"):
        quantize_model(model, scheme='block32')
