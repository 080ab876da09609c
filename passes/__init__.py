"""optcc's built-in passes. Importing this package registers every pass in it.

Each module holds one pass (plus its rules); helpers shared by several passes live in
modules whose names start with an underscore.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
