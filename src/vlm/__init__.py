"""vlm: QLoRA fine-tuning of vision-language models with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"


def _kernels_of_a_source_checkout() -> None:
    """Make ``vlm.kernels`` importable from a source checkout (an editable install).

    The wheel ships the repository's top-level ``kernels/`` as ``vlm/kernels``; an editable
    install sees only ``src/vlm``, so the package is registered here from its real location.
    (It is never put on ``sys.path`` as ``kernels``: transformers probes for a package of that name.)
    """
    import importlib.util
    import sys
    from pathlib import Path

    package = Path(__file__).resolve().parent
    source = package.parents[1] / "kernels" / "__init__.py"
    if (package / "kernels").is_dir() or not source.is_file() or "vlm.kernels" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("vlm.kernels", source, submodule_search_locations=[str(source.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["vlm.kernels"] = module
    setattr(sys.modules[__name__], "kernels", module)
    spec.loader.exec_module(module)


_kernels_of_a_source_checkout()
