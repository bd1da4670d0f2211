"""BasePipeline: the batching loop shared by task pipelines."""


def positive_int(value, name):
    """`value` as an int >= 1, or a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class BasePipeline:
    """A task pipeline around `model` (and usually `tokenizer`).

    `pipe(inputs, batch_size=None, **kwargs)`: `inputs` is one item or a list of items; the list is cut into
    batches of `batch_size` (default: the constructor's, else `model.config.batch_size`, else 1) and each batch
    goes `preprocess` -> `forward` -> `postprocess`. Returns a list with one result per item. Keyword options
    given to the constructor are defaults that call-time ones override; `check_options` vets them up front.
    Subclasses implement the three steps (and may override `check_options`)."""

    def __init__(self, model, tokenizer=None, batch_size=None, **kwargs):
        self.model, self.tokenizer = model, tokenizer
        default = getattr(getattr(model, 'config', None), 'batch_size', None) or 1
        self.batch_size = positive_int(default if batch_size is None else batch_size, 'batch_size')
        self.check_options(kwargs)
        self.default_options = kwargs

    def check_options(self, options):
        """Raise on an unknown or bad option; called with the construction-time options."""

    def preprocess(self, items):
        """A batch of raw items -> model inputs."""
        raise NotImplementedError

    def forward(self, model_inputs, **options):
        """Model inputs -> model outputs, with the merged options."""
        raise NotImplementedError

    def postprocess(self, model_outputs):
        """Model outputs -> a list of results, one per item of the batch."""
        raise NotImplementedError

    def __call__(self, inputs, batch_size=None, **kwargs):
        items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        size = self.batch_size if batch_size is None else positive_int(batch_size, 'batch_size')
        options = {**self.default_options, **kwargs}
        results = []
        for start in range(0, len(items), size):
            results += self.postprocess(self.forward(self.preprocess(items[start:start + size]), **options))
        return results
