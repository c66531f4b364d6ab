"""One file per paper. Each module registers its Algorithm subclass with
`fedmed.register`; `load_all()` imports them all. Importing this package plugs the model
zoo (models.py) into the core, which imports no module of the project."""
import importlib
import pkgutil

import models  # noqa: F401 - registers the default model builder with fedmed


def load_all() -> None:
    """Import every module of algorithms/ so that each registers itself."""
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
