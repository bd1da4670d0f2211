"""The `quantization` and `quantization_config` keys of a model config."""
from mindformers.quantization.formats import SCHEMES

METHODS = ('int8',)
DEFAULTS = {'scheme': 'block32', 'embeddings': False}


def quantization_settings(quantization, quantization_config=None, where='model_config'):
    """None (no quantization: `quantization` None, '' or 'none'), or {'scheme', 'embeddings'} for `quantization:
    int8` with `quantization_config` ({scheme: block32 | channel, embeddings: bool}, each optional). ValueError
    naming `<where>.<key>` for anything else."""
    if quantization in (None, '', 'none'):
        if quantization_config:
            raise ValueError(f"{where}.quantization_config is set but {where}.quantization is not; set "
                             f"quantization: int8")
        return None
    if quantization not in METHODS:
        raise ValueError(f"{where}.quantization must be one of {', '.join(METHODS)} (or unset), got {quantization!r}")
    given = dict(quantization_config or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{where}.quantization_config: unknown key(s) {', '.join(unknown)} (accepted: "
                         f"{', '.join(DEFAULTS)})")
    settings = {**DEFAULTS, **given}
    if settings['scheme'] not in SCHEMES:
        raise ValueError(f"{where}.quantization_config.scheme must be one of {', '.join(SCHEMES)}, got "
                         f"{settings['scheme']!r}")
    if not isinstance(settings['embeddings'], bool):
        raise ValueError(f"{where}.quantization_config.embeddings must be true or false, got "
                         f"{settings['embeddings']!r}")
    return settings


def config_settings(config):
    """`quantization_settings` of a model config object (None when it has no such fields)."""
    return quantization_settings(getattr(config, 'quantization', None), getattr(config, 'quantization_config', None),
                                 type(config).__name__)
