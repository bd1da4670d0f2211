"""Registered model names and their published weights.

A registered name `<name>` resolves to `run_<name>.yaml` in a folder a registered family declares
(`FamilySpec.yaml_dirs`, e.g. `configs/llama`, `research/pengcheng_mind`).

Where a name's weights are published, `SOURCES[name]` says where: a `HubSource` (a HuggingFace Hub repository:
config.json, weights and tokenizer files, downloaded by `tools.hub` and converted once by the family's converter),
or `CHECKPOINTS[name] = (url, sha256)` (one `.ckpt` / `.safetensors` file in our names). A `*_lora` / `*_ptuning2`
name takes its base name's source (the PET delta starts fresh). Add your own with `register_source` /
`register_checkpoint`. Names without published weights (the `*_tiny` test configs, LLaMA-1, gpt2_13b) are built
with `AutoModel.from_config`."""
import dataclasses
import glob
import os
import re

from mindformers.tools.register.family import yaml_dirs


def list_models():
    """{name: yaml path} for every `run_<name>.yaml` of a registered family (the first folder holding a name wins)."""
    found = {}
    for folder in yaml_dirs():
        for path in sorted(glob.glob(os.path.join(folder, 'run_*.yaml'))):
            name = os.path.basename(path)[len('run_'):-len('.yaml')]
            found.setdefault(name, path)
    return found


def find_config(name):
    """The YAML path of a registered model name; unknown names raise ValueError listing the known ones."""
    models = list_models()
    if name in models:
        return models[name]
    import difflib
    close = difflib.get_close_matches(name, list(models), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model name {name!r}{hint} (known: {', '.join(sorted(models))})")


@dataclasses.dataclass(frozen=True)
class HubSource:
    """Weights published in a HuggingFace Hub repository.

    repo: '<organisation>/<name>'; revision: a branch, tag or commit. weights: 'hf' (config.json + HF weights, read
    through the family's HF converter) or 'mindspore' (the repository's one `.ckpt`, in the family's MindSpore
    release naming, converted with the run YAML's config). sha256: ((file, sha256), ...) pinned hashes; files not
    pinned are checked against the hash the Hub declares. gated: the repository needs an accepted license and
    HF_TOKEN (documentation: the server decides)."""

    repo: str
    revision: str = 'main'
    weights: str = 'hf'
    sha256: tuple = ()
    gated: bool = False

    def hub_repo(self, offline=None):
        from mindformers.tools.hub import HubRepo
        return HubRepo(self.repo, self.revision, dict(self.sha256), offline)


_GATED = dict(gated=True)
SOURCES = {
    'gpt2': HubSource('openai-community/gpt2'),
    'gpt2_medium': HubSource('openai-community/gpt2-medium'),
    'gpt2_large': HubSource('openai-community/gpt2-large'),
    'gpt2_xl': HubSource('openai-community/gpt2-xl'),
    'llama2_7b': HubSource('meta-llama/Llama-2-7b-hf', **_GATED),
    'llama2_13b': HubSource('meta-llama/Llama-2-13b-hf', **_GATED),
    'llama2_70b': HubSource('meta-llama/Llama-2-70b-hf', **_GATED),
    'glm_6b': HubSource('THUDM/chatglm-6b'),
    'glm_6b_chat': HubSource('THUDM/chatglm-6b'),
    'glm2_6b': HubSource('THUDM/chatglm2-6b'),
    'pangualpha_2_6b': HubSource('sunzeyeah/pangu-2_6B'),
    'pangualpha_13b': HubSource('sunzeyeah/pangu-13B'),
    'pengcheng_mind_7b': HubSource('PCLNLP/mPengC.mind_npu', weights='mindspore'),
}
CHECKPOINTS = {}
_VARIANT = re.compile(r'_(lora|ptuning2)$')


def register_source(name, source):
    """Publish weights for a registered model name: a HubSource (or a repository name, 'org/name')."""
    find_config(name)
    source = HubSource(source) if isinstance(source, str) else source
    if not isinstance(source, HubSource) or source.weights not in ('hf', 'mindspore'):
        raise ValueError(f"register_source({name!r}): expected a HubSource (weights 'hf' or 'mindspore') or "
                         f"'<organisation>/<name>', got {source!r}")
    SOURCES[name] = source


def register_checkpoint(name, url, sha256):
    """Publish weights for a registered model name: a URL of a `.ckpt` / `.safetensors` file and its sha256."""
    find_config(name)
    if not (isinstance(sha256, str) and len(sha256) == 64):
        raise ValueError(f"register_checkpoint({name!r}): sha256 must be a 64-character hex digest, got {sha256!r}")
    CHECKPOINTS[name] = (url, sha256.lower())


def source_for(name):
    """The HubSource of a name (or of the base of a `*_lora` / `*_ptuning2` name), else None."""
    return SOURCES.get(name) or SOURCES.get(_VARIANT.sub('', name))


def has_weights(name):
    return source_for(name) is not None or name in CHECKPOINTS


def no_weights_message(name):
    return (f"{name!r} has no published weights (model_book.SOURCES / CHECKPOINTS list those that do): build it "
            f"with fresh weights with AutoModel.from_config(AutoConfig.from_pretrained({name!r})), or give weights: "
            f"checkpoint_name_or_path=<file or directory>, or a directory of converted weights")


def checkpoint_for(name, offline=None):
    """Path of a checkpoint in our names for `name`'s published weights (downloaded, and converted once from a Hub
    source: the first call builds the model to convert them), or None when it has none."""
    if source_for(name) is not None:
        from mindformers.models.auto.auto_class import converted_checkpoint
        return converted_checkpoint(name)
    if name not in CHECKPOINTS:
        return None
    from mindformers.tools.download import download_file
    url, sha256 = CHECKPOINTS[name]
    suffix = os.path.splitext(os.path.basename(url))[1] or '.ckpt'
    return download_file(url, sha256=sha256, filename=f'{name}{suffix}', cache_subdir='checkpoints',
                         offline=offline)
