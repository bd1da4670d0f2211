"""TextGenerationPipeline: prompts in, continued text out."""
from mindformers.generation import GenerationConfig
from mindformers.generation.text_generator import encode_prompt
from mindformers.pipeline.base_pipeline import BasePipeline
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

# options that go to generate() as arguments of their own, not as GenerationConfig fields
GENERATE_ARGUMENTS = ('generation_config', 'streamer', 'seed')


@MindFormerRegister.register(MindFormerModuleType.PIPELINE, alias='text_generation')
@MindFormerRegister.register(MindFormerModuleType.PIPELINE)
class TextGenerationPipeline(BasePipeline):
    """`pipe(text or [texts], **generate_kwargs)` -> `[{'text_generation_text': [prompt + continuation]}]`, one per
    input (MindFormers' output form). Every prompt is checked and encoded by `tokenizer.encode_prompt` (its BOS, no
    EOS) before any is generated (an error names the prompt, and its index when a list was given), then run through
    `model.generate` in batches of `batch_size` (ragged prompts are left-padded there) and decoded without special
    tokens. Options are GenerationConfig fields (max_new_tokens, do_sample, top_k, ...) and generate's
    `streamer`, `seed`, `generation_config`."""

    def __init__(self, model, tokenizer=None, batch_size=None, **generate_kwargs):
        if tokenizer is None:
            raise ValueError("TextGenerationPipeline needs a tokenizer (pass tokenizer=..., or a model name or "
                             "directory it can be loaded from)")
        super().__init__(model, tokenizer, batch_size, **generate_kwargs)

    def check_options(self, options):
        GenerationConfig(**{k: v for k, v in options.items() if k not in GENERATE_ARGUMENTS}).validate()

    def prepare(self, items, indexed):
        ids = []
        for index, text in enumerate(items):
            if not isinstance(text, str):
                raise TypeError(f"TextGenerationPipeline takes a string or a list of strings, got {text!r} "
                                f"({type(text).__name__})")
            ids.append(encode_prompt(self.tokenizer, text, int(self.model.config.vocab_size),
                                     index if indexed else None))
        return ids

    def preprocess(self, items):
        return items

    def forward(self, model_inputs, **options):
        return self.model.generate(model_inputs, **options)

    def postprocess(self, model_outputs):
        return [{'text_generation_text': [self.tokenizer.decode(ids, skip_special_tokens=True)]}
                for ids in model_outputs]
