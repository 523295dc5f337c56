"""autotransfer: pick and train the right transfer-learning recipe for a folder of images.

The Python API (`autotransfer.api`) is re-exported here: `fit`, `profile`, `plan`, `load`,
`Run`, `Model`, `Prediction`, `Plan`, `Profile`. The names `plan` and `profile` are
these functions, not the submodules of the same name: import from those with
`from autotransfer.plan import ...`.
"""

import sys
import types

__version__ = "0.1.0"

__all__ = ["Model", "Plan", "Prediction", "Profile", "Run", "__version__", "fit", "load", "plan", "profile"]


def __getattr__(name: str):
    """The API on first use (PEP 562): importing torch and timm takes seconds, and the
    command line must not pay them for `--help` or a mistyped path."""
    if name in __all__:
        from autotransfer import api

        return getattr(api, name)
    raise AttributeError(f"module 'autotransfer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})  # tab completion lists the API before its first use


def _api_function(name: str) -> property:
    """`plan` and `profile` name both an API function and a submodule; importing the
    submodule binds it on the package, so the function is a property the import ignores."""
    return property(lambda _: __getattr__(name), lambda _, value: None)


class _Package(types.ModuleType):
    plan = _api_function("plan")
    profile = _api_function("profile")


sys.modules[__name__].__class__ = _Package
