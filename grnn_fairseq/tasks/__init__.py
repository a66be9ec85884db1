"""Every module in this folder is a registered fairseq task; importing the folder registers them all."""

import importlib
import os

for _file in sorted(os.listdir(os.path.dirname(__file__))):
    if _file.endswith(".py") and not _file.startswith("_"):
        importlib.import_module(__name__ + "." + _file[: -len(".py")])
