"""Test-only stand-in for a model hub (imported at interpreter start-up when this folder is on PYTHONPATH).

With ``ROBUSTFT_FAKE_HUB`` set to JSON ``{"model", "tag", "url", "log"}``, every Python process that imports
``open_clip.pretrained`` finds ``tag`` registered as a pretrained tag of ``model`` (the tiny test model), downloaded
from ``url`` (a local HTTP server of the test), and appends its command line and ``HF_HUB_OFFLINE`` to ``log``.
Without the variable it does nothing.
"""

import json
import os
import sys

_SPEC = os.environ.get("ROBUSTFT_FAKE_HUB")

if _SPEC:
    import importlib.abc
    import importlib.util

    class _RegisterTag(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "open_clip.pretrained":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                cfg = json.loads(_SPEC)
                module._PRETRAINED.setdefault(cfg["model"], {})[cfg["tag"]] = module._pcfg(url=cfg["url"])
                with open(cfg["log"], "a") as log:
                    log.write(json.dumps({"argv": sys.argv, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE")}) + "\n")

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _RegisterTag())
