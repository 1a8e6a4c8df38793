"""Short form (CI) or long form (`ARCHFARM_CHAOS=long`, by hand) of the chaos suite."""

from __future__ import annotations

import os

LONG = os.environ.get("ARCHFARM_CHAOS", "short") == "long"
