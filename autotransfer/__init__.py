"""autotransfer: pick and train the right transfer-learning recipe for a folder of images.

The Python API (`autotransfer.api`) is re-exported here: `fit`, `profile`, `plan`, `load`,
`Run`, `Model`, `Prediction`, `Plan`, `Profile`. The names `plan` and `profile` are
these functions, not the submodules of the same name: import from those with
`from autotransfer.plan import ...`.
"""

__version__ = "0.1.0"

from autotransfer.api import Model, Plan, Prediction, Profile, Run, fit, load, plan, profile  # noqa: E402

__all__ = ["Model", "Plan", "Prediction", "Profile", "Run", "__version__", "fit", "load", "plan", "profile"]
