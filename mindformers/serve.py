"""`python -m mindformers.serve --model <registered name | YAML | directory> [--load_checkpoint PATH]
[--pet_checkpoint PATH] [--host 127.0.0.1] [--port 8000] ...`: the OpenAI-compatible server
(`mindformers.serving.cli`; `--help` lists the flags)."""
import os
import sys

if __name__ == '__main__':
    os.environ.setdefault('GLOG_v', '3')  # before MindSpore loads: keep its warnings quiet

from mindformers.serving.cli import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
