"""On ``PYTHONPATH``, makes bitsandbytes take the code paths of a CPU without AVX512-BF16.

bitsandbytes decides once, while it is imported, from ``bitsandbytes.functional.has_avx512bf16``
(the CPU inference kernels it registers, and each ``Linear4bit``'s in-place repacking). This hook
answers ``False`` there before any other bitsandbytes module reads it, so that a test on a CPU
that has the instruction set can also run the path every other CPU takes.
"""

import importlib.abc
import importlib.util
import sys

TARGET = "bitsandbytes.functional"


class _AnswerNoAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # noqa: ANN001
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # find the real module, once
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):  # noqa: ANN001
            run_module(module)
            module.has_avx512bf16 = lambda: False

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AnswerNoAvx512Bf16())
