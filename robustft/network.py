"""The model hub's offline switches: every job runs offline; only rule weights (on the submit node) may download.

The workflow sets the switches at parse time, so that every job it starts (locally, or on a cluster node, where the
job parses the workflow again) inherits them; the values the user had are saved beside them, and
:func:`restore_user_hub_env` gives them back to the weights rule before it imports the hub client.
"""

from __future__ import annotations

import json
import os
from typing import MutableMapping

#: Environment variables that keep huggingface_hub (and the libraries on top of it) off the network.
HUB_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
#: Where the user's own values of :data:`HUB_OFFLINE_VARS` are kept while the workflow has them switched on.
SAVED_VAR = "ROBUSTFT_USER_HUB_ENV"


def set_jobs_offline(environ: MutableMapping[str, str] = os.environ) -> None:
    """Switch the hub offline in ``environ`` (idempotent: the user's values are saved the first time only)."""
    if SAVED_VAR not in environ:
        environ[SAVED_VAR] = json.dumps({name: environ.get(name) for name in HUB_OFFLINE_VARS})
    environ.update({name: "1" for name in HUB_OFFLINE_VARS})


def restore_user_hub_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Give the hub switches back the values the user had (call before importing huggingface_hub or open_clip)."""
    if SAVED_VAR not in environ:
        return
    for name, value in json.loads(environ[SAVED_VAR]).items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
