"""`keyword_names`: the keyword arguments a registered class accepts (the run-config check,
`mindformers.trainer.run_config`, and the configs' and tokenizers' own key checks use it)."""
import inspect


def keyword_names(cls, last=None):
    """The keyword arguments `cls(...)` accepts, following **kwargs up the class hierarchy (to `last` at most, whose
    own **kwargs then do not count); None when the chain ends in **kwargs (then anything may be valid)."""
    if not inspect.isclass(cls):
        return None
    names = set()
    for klass in cls.__mro__:
        init = vars(klass).get('__new__' if '__new__' in vars(klass) and klass is not object else '__init__')
        if init is None or klass is object:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            return None
        names.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if klass is last or not any(p.kind == p.VAR_KEYWORD for p in params):
            names -= {'self', 'cls'}
            return names
    return None
