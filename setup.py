"""The one compiled piece: the suffix trie's append loop (metadata and packages live in pyproject.toml).

Optional: without a C compiler the install still succeeds and the trie runs its pure-Python path.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("glassbox.inference.speculative._suffix_trie", ["inference/speculative/_suffix_trie.c"],
                             extra_compile_args=["-O2"], optional=True)])
