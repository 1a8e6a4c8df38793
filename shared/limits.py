"""Time limits derived from a profile: the farm's guard against hung tasks and redelivery races."""

from __future__ import annotations

from shared.config import Settings
from shared.errors import InvalidInput
from shared.spec import Profile

LOAD_HEADROOM_S = 300
"""Model loads (and a first compile) happen inside the first task a worker runs for a stack."""


def task_time_limit(profile: Profile, settings: Settings) -> int:
    """Hard limit for one task: a pessimistic render estimate (steps × pixels × seeds × ControlNets) plus
    headroom for loading models."""
    megapixels = profile.width * profile.height / 512**2
    per_step = settings.seconds_per_step * megapixels * (1 + 0.5 * (len(profile.controls) - 1))
    return int(LOAD_HEADROOM_S + profile.steps * profile.seeds_per_task * per_step)


def check_fits_visibility(profile: Profile, settings: Settings) -> int:
    """The task limit, refusing a profile whose tasks could outlive Redis's visibility timeout: such a task
    would be delivered a second time while it still runs."""
    limit = task_time_limit(profile, settings)
    if limit >= settings.visibility_timeout:
        raise InvalidInput(
            f"profile: a task may run {limit} s, beyond the broker's visibility timeout of "
            f"{settings.visibility_timeout} s; lower seeds_per_task or raise ARCHFARM_VISIBILITY_TIMEOUT"
        )
    return limit
