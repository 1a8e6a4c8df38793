"""Time limits derived from a profile: the farm's guard against hung tasks and redelivery races."""

from __future__ import annotations

from shared.config import Settings
from shared.errors import InvalidInput
from shared.spec import Profile

LOAD_HEADROOM_S = 300
"""Model loads (and a first compile) happen inside the first task a worker runs for a stack."""
AUTO_BATCH_IMAGES = 16
"""The most images `batch: auto` puts in one call: past 8–16 SD 1.5 images a GPU is already saturated."""


def seconds_per_image(profile: Profile, settings: Settings) -> float:
    """A pessimistic render estimate for one image: steps × pixels × ControlNets."""
    megapixels = profile.width * profile.height / 512**2
    per_step = settings.seconds_per_step * megapixels * (1 + 0.5 * (len(profile.controls) - 1))
    return profile.steps * per_step


def batch_cap(profile: Profile, settings: Settings) -> int:
    """Most images a worker renders in one call for this profile: its `batch` (16 for `auto`), less when so
    many would outlive the broker's visibility timeout, and never fewer than one task's seeds."""
    wanted = AUTO_BATCH_IMAGES if profile.batch == "auto" else profile.batch
    fits = int((settings.visibility_timeout * 0.9 - LOAD_HEADROOM_S) // seconds_per_image(profile, settings))
    return max(profile.seeds_per_task, min(wanted, fits))


def task_time_limit(profile: Profile, settings: Settings) -> int:
    """Hard limit for one delivery, which may render a whole batch of tasks: the estimate for `batch_cap`
    images plus headroom for loading models."""
    return int(LOAD_HEADROOM_S + batch_cap(profile, settings) * seconds_per_image(profile, settings))


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
