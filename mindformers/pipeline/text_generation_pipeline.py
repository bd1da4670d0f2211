"""TextGenerationPipeline: prompts in, continued text out."""
from mindformers.generation import GenerationConfig
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


@MindFormerRegister.register(MindFormerModuleType.PIPELINE, alias='text_generation')
@MindFormerRegister.register(MindFormerModuleType.PIPELINE)
class TextGenerationPipeline:
    """`pipe(text or [texts], **generate_kwargs)` -> `[{'text_generation_text': [prompt + continuation]}]`, one per
    input. Prompts are encoded by `tokenizer`, run through `model.generate` in batches of `batch_size` (left-padded)
    and decoded without special tokens. `generate_kwargs` given here are defaults; call-time ones override them."""

    def __init__(self, model, tokenizer, batch_size=None, **generate_kwargs):
        if tokenizer is None:
            raise ValueError("TextGenerationPipeline needs a tokenizer (pass tokenizer=..., or a model name or "
                             "directory it can be loaded from)")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = int(batch_size or getattr(model.config, 'batch_size', 1) or 1)
        GenerationConfig(**generate_kwargs).validate()  # unknown or bad options fail here, not at the first call
        self.generate_kwargs = generate_kwargs

    def __call__(self, inputs, batch_size=None, **generate_kwargs):
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("TextGenerationPipeline takes a string or a list of strings")
        options = {**self.generate_kwargs, **generate_kwargs}
        size = int(batch_size or self.batch_size)
        results = []
        for start in range(0, len(texts), size):
            ids = [self.tokenizer.encode(text) for text in texts[start:start + size]]
            outputs = self.model.generate(ids, **options)
            results += [{'text_generation_text': [self.tokenizer.decode(out, skip_special_tokens=True)]}
                        for out in outputs]
        return results
