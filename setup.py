"""The one compiled part: watchnext._native (see watchnext/_native.c). Everything else is in pyproject.toml.

It is optional: where no C compiler is at hand the install goes on without it, and the encoder
takes its Arrow path alone (the service logs which one it uses).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("watchnext._native", ["watchnext/_native.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"])])
