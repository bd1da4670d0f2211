"""Helpers shared by the test modules (test modules import from here, never from each other or from conftest):

- `cli`: run the repo's command-line tools in a subprocess and read their JSON summaries;
- `hf_reference`: transformers + PyTorch reference models and the comparisons against them;
- `glm_reference`: the NumPy reference of GLM v1 (ChatGLM-6B), which transformers does not have;
- `tiny`: tiny configs and their sizes per family, a tiny GPT-2 and data it learns;
- `training`: callbacks of the training tests (`StopAt`);
- `registry`: snapshot and restore MindFormerRegister's tables (the `clean_registry` fixture);
- `serving`: `python -m mindformers.serve` on loopback (`served`), JSON calls to it (`call`), `free_port`;
- `kernel_checks`, `tokenizer_checks`: checks shared by the CPU-kernel and tokenizer tests."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
