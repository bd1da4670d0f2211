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
    goes `preprocess` -> `forward` -> `postprocess`. Returns a list with one result per item. Before any batch runs,
    `prepare` checks (and may convert) every item of the call, so a bad item fails before any work is done. Keyword
    options given to the constructor are defaults that call-time ones override; `check_options` vets them up front.
    Subclasses implement the three steps (and may override `check_options` and `prepare`)."""

    def __init__(self, model, tokenizer=None, batch_size=None, **kwargs):
        self.model, self.tokenizer = model, tokenizer
        default = getattr(getattr(model, 'config', None), 'batch_size', None) or 1
        self.batch_size = positive_int(default if batch_size is None else batch_size, 'batch_size')
        self.check_options(kwargs)
        self.default_options = kwargs

    def check_options(self, options):
        """Raise on an unknown or bad option; called with the construction-time options."""

    def prepare(self, items, indexed):
        """All items of a call, checked -> the items `preprocess` gets in batches (default: as given). `indexed`:
        the call got a list, so an error can name the item by its index in it."""
        return items

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
        indexed = isinstance(inputs, (list, tuple))
        size = self.batch_size if batch_size is None else positive_int(batch_size, 'batch_size')
        items = self.prepare(list(inputs) if indexed else [inputs], indexed)
        options = {**self.default_options, **kwargs}
        results = []
        for start in range(0, len(items), size):
            results += self.postprocess(self.forward(self.preprocess(items[start:start + size]), **options))
        return results
