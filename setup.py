"""Packaging for mindformers. `configs/` is installed as `mindformers/configs` so registered names resolve."""
import os

from setuptools import setup, find_packages

HERE = os.path.dirname(os.path.abspath(__file__))
# the server's ASGI stack; httptools (HTTP parsing) and uvloop (event loop) are what `uvicorn[standard]` adds for
# speed, and uvicorn uses them when they are installed (its other `standard` extras are for --reload and websockets)
SERVE = ['fastapi', 'uvicorn', 'httptools',
         "uvloop; sys_platform != 'win32' and sys_platform != 'cygwin' and platform_python_implementation != 'PyPy'"]


def requirements():
    with open(os.path.join(HERE, 'requirements.txt'), encoding='utf-8') as f:
        return [line.strip() for line in f if line.strip() and not line.startswith('#')]


setup(
    name='mindformers',
    version='0.1.0',
    description='MindSpore-native suite for large transformer language models',
    long_description=open(os.path.join(HERE, 'README.md'), encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.9',
    # configs/ and research/ (families registered like models/, e.g. PengCheng.Mind) install inside the package
    packages=find_packages(include=['mindformers', 'mindformers.*']) + ['mindformers.configs'] +
    ['mindformers.research.' + name for name in find_packages('research')],
    package_dir={'mindformers.configs': 'configs', 'mindformers.research': 'research'},
    package_data={'mindformers': ['assets/**/*', 'assets/*/*', 'kernels/*.cc', 'serving/static/*'],
                  'mindformers.configs': ['*/*.yaml', '*.yaml'],
                  **{'mindformers.research.' + name: ['*.yaml', '*.md'] for name in find_packages('research')}},
    include_package_data=True,
    install_requires=requirements(),
    # serve: `python -m mindformers.serve` (the library imports without it); test: the server's tests drive it with
    # the official openai client and httpx, the chat page's in Chromium through playwright (Debian's chromium:
    # scripts/install_test_system_deps.sh)
    extras_require={'serve': SERVE,
                    'test': ['pytest', 'torch==2.13.0', 'transformers', 'peft', 'matplotlib', *SERVE,
                             'openai', 'httpx', 'prometheus_client', 'playwright']},
    py_modules=['run_mindformer', 'convert_weight'],
)
