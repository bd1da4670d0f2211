"""pipeline('text_generation'): from a registered name, a directory or an instance; batching; option precedence."""
import pytest

from mindformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, TextGenerationPipeline, pipeline
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

SMALL = dict(num_layers=1, hidden_size=32, num_heads=2)


@pytest.fixture(scope='module')
def pipe():
    return pipeline('text_generation', model='gpt2_tiny', seq_length=48, use_past=True, max_new_tokens=6)


def continuation(result, prompt):
    (text,) = result['text_generation_text']
    assert text.startswith(prompt)
    return text[len(prompt):]


def test_registered_name_with_build_time_options(pipe):
    assert isinstance(pipe, TextGenerationPipeline)
    assert pipe.model.config.seq_length == 48 and pipe.model.config.use_past
    (result,) = pipe('ROMEO:')
    assert len(continuation(result, 'ROMEO:')) > 0


def test_lists_are_batched_and_match_single_calls(pipe):
    prompts = ['ROMEO:', 'To be, or not', 'First Citizen:']
    batched = pipe(prompts, batch_size=2)
    assert batched == [pipe(p)[0] for p in prompts]


def test_call_time_options_override_build_time_ones(pipe):
    ids = pipe.tokenizer.encode('ROMEO:')

    def expected(**options):
        out = pipe.model.generate([ids], **options)[0]
        return [{'text_generation_text': [pipe.tokenizer.decode(out, skip_special_tokens=True)]}]

    assert pipe('ROMEO:') == expected(max_new_tokens=6)
    assert pipe('ROMEO:', max_new_tokens=12, eos_token_id=[]) == expected(max_new_tokens=12, eos_token_id=[])
    assert expected(max_new_tokens=12, eos_token_id=[]) != expected(max_new_tokens=6, eos_token_id=[])


def test_instance_and_directory(pipe, tmp_path):
    model = pipe.model
    from_instance = pipeline('text_generation', model=model, tokenizer=pipe.tokenizer, max_new_tokens=6)
    assert from_instance('ROMEO:') == pipe('ROMEO:')
    model.save_pretrained(tmp_path)
    pipe.tokenizer.save_pretrained(tmp_path)
    from_directory = pipeline('text_generation', model=str(tmp_path), max_new_tokens=6)
    assert from_directory('ROMEO:') == pipe('ROMEO:')


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
    with pytest.raises(TypeError, match='string or a list of strings'):
        pipeline('text_generation', model=model, tokenizer=AutoTokenizer.from_pretrained('gpt2_tiny'))([1, 2])


def test_a_user_pipeline_plugs_in_by_name(pipe):
    @MindFormerRegister.register(MindFormerModuleType.PIPELINE, alias='shouting')
    class Shouting(TextGenerationPipeline):
        def __call__(self, inputs, **kwargs):
            return [{'text_generation_text': [r['text_generation_text'][0].upper()]}
                    for r in super().__call__(inputs, **kwargs)]

    shout = pipeline('shouting', model=pipe.model, tokenizer=pipe.tokenizer, max_new_tokens=6)
    assert shout('ROMEO:')[0]['text_generation_text'][0] == pipe('ROMEO:')[0]['text_generation_text'][0].upper()
