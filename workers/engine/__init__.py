"""The render engine: model registry and cache, pipeline assembly, one render.

Library progress bars are switched off here: a worker's log gets one line per task, not a bar per load.
"""

from diffusers.utils import logging as _diffusers_logging
from transformers.utils import logging as _transformers_logging

_diffusers_logging.disable_progress_bar()
_transformers_logging.disable_progress_bar()
