"""pipeline('text_generation'): from a directory, a YAML or an instance (a registered name with published weights:
tests/test_hub.py); batching; option precedence."""
import os

import pytest

from mindformers import AutoModel, AutoTokenizer, GPT2Config, GPT2LMHeadModel, TextGenerationPipeline, TextStreamer, pipeline
from mindformers.pipeline import BasePipeline
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

SMALL = dict(num_layers=1, hidden_size=32, num_heads=2)


@pytest.fixture(scope='module')
def pipe(tmp_path_factory):
    directory = tmp_path_factory.mktemp('gpt2_tiny')  # gpt2_tiny with fresh weights, saved
    AutoModel.from_config('gpt2_tiny', seq_length=48).save_pretrained(directory)
    AutoTokenizer.from_pretrained('gpt2_tiny').save_pretrained(directory)
    return pipeline('text_generation', model=str(directory), seq_length=48, use_past=True, max_new_tokens=6)


def continuation(result, prompt):
    (text,) = result['text_generation_text']
    assert text.startswith(prompt)
    return text[len(prompt):]


def test_build_time_options(pipe):
    assert isinstance(pipe, TextGenerationPipeline)
    assert pipe.model.config.seq_length == 48 and pipe.model.config.use_past
    (result,) = pipe('ROMEO:')
    assert len(continuation(result, 'ROMEO:')) > 0


def test_lists_are_batched_and_match_single_calls(pipe):
    prompts = ['ROMEO:', 'To be, or not', 'First Citizen:']
    batched = pipe(prompts, batch_size=2)
    assert batched == [pipe(p)[0] for p in prompts]


def test_call_time_options_override_build_time_ones(pipe):
    ids = pipe.tokenizer.encode_prompt('ROMEO:')
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[1:] == pipe.tokenizer.encode('ROMEO:', False)  # no EOS

    def expected(**options):
        out = pipe.model.generate([ids], **options)[0]
        return [{'text_generation_text': [pipe.tokenizer.decode(out, skip_special_tokens=True)]}]

    assert pipe('ROMEO:') == expected(max_new_tokens=6)
    assert pipe('ROMEO:', max_new_tokens=12, eos_token_id=[]) == expected(max_new_tokens=12, eos_token_id=[])
    assert expected(max_new_tokens=12, eos_token_id=[]) != expected(max_new_tokens=6, eos_token_id=[])


def test_streamer_and_seed_pass_through(pipe):
    class Collect(TextStreamer):
        def on_text(self, text, stream_end=False):
            self.text = getattr(self, 'text', '') + text

    at_call = Collect(pipe.tokenizer, skip_prompt=True, skip_special_tokens=True)
    (result,) = pipe('ROMEO:', streamer=at_call)
    assert at_call.text == continuation(result, 'ROMEO:')
    at_build = Collect(pipe.tokenizer, skip_prompt=True, skip_special_tokens=True)
    built = pipeline('text_generation', model=pipe.model, tokenizer=pipe.tokenizer, max_new_tokens=6,
                     streamer=at_build)
    assert built('ROMEO:') == [result] and at_build.text == at_call.text
    sampled = [pipe('ROMEO:', do_sample=True, top_k=0, seed=seed, eos_token_id=[]) for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_instance_use_past_is_a_build_time_switch(pipe):
    cached = pipe(['ROMEO:', 'To be'])
    try:
        recompute = pipeline('text_generation', model=pipe.model, tokenizer=pipe.tokenizer, use_past=False,
                             max_new_tokens=6)
        assert pipe.model.config.use_past is False
        assert recompute(['ROMEO:', 'To be']) == cached
    finally:
        pipe.model.config.use_past = True


def test_instance_and_directory(pipe, tmp_path):
    model = pipe.model
    from_instance = pipeline('text_generation', model=model, tokenizer=pipe.tokenizer, max_new_tokens=6)
    assert from_instance('ROMEO:') == pipe('ROMEO:')
    model.save_pretrained(tmp_path)
    pipe.tokenizer.save_pretrained(tmp_path)
    from_directory = pipeline('text_generation', model=str(tmp_path), max_new_tokens=6)
    assert from_directory('ROMEO:') == pipe('ROMEO:')
    assert pipeline('text_generation', model=model, tokenizer=str(tmp_path), max_new_tokens=6)('ROMEO:') == \
        pipe('ROMEO:')


def test_yaml_and_huggingface_directory(tmp_path):
    import torch
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel as HFModel, GPT2TokenizerFast as HFTokenizer
    from mindformers.tools.model_book import find_config
    from mindformers.tools.utils import resolve_path
    small = dict(hidden_size=32, num_layers=1, num_heads=2, seq_length=32)
    AutoModel.from_config('gpt2_tiny', **small).save_pretrained(tmp_path / 'small')
    yaml = tmp_path / 'run_small.yaml'
    yaml.write_text(f"base_config: {os.path.abspath(find_config('gpt2_tiny'))}\n"
                    "model:\n  model_config: {hidden_size: 32, num_layers: 1, num_heads: 2, "
                    f"checkpoint_name_or_path: {tmp_path / 'small' / 'model.safetensors'}}}\n")
    from_yaml = pipeline('text_generation', model=yaml, seq_length=32, max_new_tokens=3)
    assert from_yaml.model.config.num_layers == 1 and from_yaml.model.config.seq_length == 32
    (result,) = from_yaml('ROMEO:')
    assert continuation(result, 'ROMEO:')
    torch.manual_seed(0)
    hf = HFModel(HFConfig(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                          eos_token_id=0, bos_token_id=0)).eval()
    hf.save_pretrained(tmp_path / 'hf')
    tokenizer = HFTokenizer(resolve_path('assets/gpt2_tiny/vocab.json'), resolve_path('assets/gpt2_tiny/merges.txt'))
    tokenizer.save_pretrained(tmp_path / 'hf')
    ids = tokenizer.encode('ROMEO:')
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=0,
                               eos_token_id=None)[0].tolist()
    from_hf = pipeline('text_generation', model=tmp_path / 'hf', max_new_tokens=4, eos_token_id=[])
    assert from_hf('ROMEO:') == [{'text_generation_text': [tokenizer.decode(expected, skip_special_tokens=True)]}]


def test_errors():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, seq_length=32, **SMALL))
    with pytest.raises(ValueError, match="unknown pipeline task 'translate'.*text_generation"):
        pipeline('translate', model=model)
    with pytest.raises(ValueError, match='seq_length 32'):
        pipeline('text_generation', model=model, tokenizer=AutoTokenizer.from_pretrained('gpt2_tiny'),
                 seq_length=64)
    with pytest.raises(ValueError, match='needs a tokenizer'):
        pipeline('text_generation', model=model)
    with pytest.raises(TypeError, match='unknown generation option.*num_layers'):
        pipeline('text_generation', model=model, tokenizer=AutoTokenizer.from_pretrained('gpt2_tiny'), num_layers=2)
    with pytest.raises(ValueError, match='top_p'):
        pipeline('text_generation', model=model, tokenizer=AutoTokenizer.from_pretrained('gpt2_tiny'), top_p=2.0)
    tokenizer = AutoTokenizer.from_pretrained('gpt2_tiny')
    pipe = pipeline('text_generation', model=model, tokenizer=tokenizer, max_new_tokens=2)
    with pytest.raises(TypeError, match='string or a list of strings, got 1'):
        pipe(['ROMEO:', 1])
    assert pipe('') and pipe.tokenizer.encode_prompt('') == [pipe.tokenizer.bos_token_id]  # GPT-2's BOS alone
    plain = pipeline('text_generation', model=model, max_new_tokens=2,
                     tokenizer=AutoTokenizer.from_pretrained('gpt2_tiny', add_bos_token=False, add_eos_token=False))
    with pytest.raises(ValueError, match="prompt 1 '' encodes to no tokens"):  # a list's prompt is named by index
        plain(['ROMEO:', ''])
    with pytest.raises(ValueError, match=r"prompt 1 'ab\\udcff' is not valid text: character 2 is the lone surrogate"):
        pipe(['ROMEO:', 'ab\udcff'])
    wider = pipeline('text_generation', model=model, max_new_tokens=2,
                     tokenizer=AutoTokenizer.from_pretrained('gpt2_tiny', pad_token='<pad>'))  # id 512: no row
    with pytest.raises(ValueError, match=r"prompt 'a<pad>' \(tokenizer GPT2Tokenizer\) has token id 512 at position "
                                         r"2, outside the model's vocabulary \[0, 512\)"):
        wider('a<pad>')
    assert pipe([]) == []
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f'batch_size must be a positive integer, got {bad}'):
            pipeline('text_generation', model=model, tokenizer=tokenizer, batch_size=bad)
        with pytest.raises(ValueError, match='batch_size must be a positive integer'):
            pipe('ROMEO:', batch_size=bad)
    with pytest.raises(ValueError, match="use_past must be True or False, got 'yes'"):
        pipeline('text_generation', model=model, tokenizer=tokenizer, use_past='yes')
    with pytest.raises(ValueError, match='the path does not exist'):
        pipeline('text_generation', model='/no/such/model_dir')
    with pytest.raises(TypeError, match='model with a `config`'):
        pipeline('text_generation', model=object(), tokenizer=tokenizer)
    with pytest.raises(ValueError, match='needs model='):
        pipeline('text_generation')


def test_a_user_pipeline_plugs_in_by_name(pipe, clean_registry):
    @MindFormerRegister.register(MindFormerModuleType.PIPELINE, alias='shouting')
    class Shouting(TextGenerationPipeline):
        def __call__(self, inputs, **kwargs):
            return [{'text_generation_text': [r['text_generation_text'][0].upper()]}
                    for r in super().__call__(inputs, **kwargs)]

    shout = pipeline('shouting', model=pipe.model, tokenizer=pipe.tokenizer, max_new_tokens=6)
    assert shout('ROMEO:')[0]['text_generation_text'][0] == pipe('ROMEO:')[0]['text_generation_text'][0].upper()

    @MindFormerRegister.register(MindFormerModuleType.PIPELINE, alias='token_count')
    class TokenCount(BasePipeline):
        batches = []

        def preprocess(self, items):
            self.batches.append(list(items))
            return [self.tokenizer.encode(text) for text in items]

        def forward(self, model_inputs, **options):
            return [len(ids) * options.get('scale', 1) for ids in model_inputs]

        def postprocess(self, model_outputs):
            return [{'tokens': n} for n in model_outputs]

    texts = ['a b', 'c', 'd e f']
    saved_batch_size = pipe.model.config.batch_size
    try:
        count = pipeline('token_count', model=pipe.model, tokenizer=pipe.tokenizer, batch_size=2, scale=10)
        assert pipe.model.config.batch_size == 2  # a build-time option: set on the instance's config
    finally:
        pipe.model.config.batch_size = saved_batch_size
    assert count(texts) == [{'tokens': 10 * len(pipe.tokenizer.encode(t))} for t in texts]
    assert TokenCount.batches == [['a b', 'c'], ['d e f']]
    assert count('a', scale=1) == [{'tokens': len(pipe.tokenizer.encode('a'))}]
