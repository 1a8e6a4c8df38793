"""Whether a hub model can be had on this machine: from the local Hugging Face cache, or downloaded now.

A model missing from the cache is downloaded on first use. With the hub out of reach, the hub libraries
first spend their retries (or wait on a network that never answers) and then fail with a message about
snapshots; one short probe of the hub, made only for a missing model and once per process, turns that into
an immediate one-line refusal that says how to get the model.
"""

from __future__ import annotations

import functools

import huggingface_hub.constants
from huggingface_hub import get_session, try_to_load_from_cache

from shared.registry import is_hub_id

PROBE_TIMEOUT_S = 3.0
"""Long enough for a distant hub to answer, short enough that a missing model is refused without a wait."""


def cached(repo_id: str, filename: str) -> bool:
    """Whether `filename` of `repo_id` (its config, the first file any load reads) is in the local cache."""
    return cached_file(repo_id, filename) is not None


def cached_file(repo_id: str, filename: str) -> str | None:
    """Where `filename` of `repo_id` lies in the local cache; None when it is not there."""
    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None


def unavailable(repo_id: str) -> str | None:
    """For a model missing from the local cache: why it cannot be downloaded now, in one line that says how
    to get it; None when the hub answers (the model is then downloaded on first use)."""
    constants = huggingface_hub.constants
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    elif not reachable(constants.ENDPOINT):
        why = f"the hub ({constants.ENDPOINT}) cannot be reached"
    else:
        return None
    return (
        f"{repo_id} is not in the local Hugging Face cache and {why}; download it with `hf download {repo_id}` "
        f"(or `huggingface-cli download {repo_id}`) into {constants.HF_HUB_CACHE}, the cache HF_HOME or "
        "HF_HUB_CACHE sets"
    )


def unloadable(location: str, config: str) -> str | None:
    """For a loader about to read `location` (a folder or a hub id): why it cannot, in one line, when it is a
    hub model missing from the local cache (its `config` file) that cannot be downloaded now; None otherwise,
    the loader's own errors telling the rest."""
    if not is_hub_id(location) or cached(location, config):
        return None
    return unavailable(location)


@functools.cache
def reachable(endpoint: str) -> bool:
    """Whether `endpoint` answers an HTTP request within PROBE_TIMEOUT_S, with any status: asked once per
    process and endpoint (`reachable.cache_clear()` forgets the answers). The hub library's own client is
    used, so the proxies and certificates it is configured with apply."""
    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    # Which errors the client raises depends on the hub library's version; any failure means no answer.
    except Exception:  # noqa: BLE001
        return False
    return True
