"""Depth maps built from a floor plan's geometry, the condition image for a depth ControlNet.

A monocular depth model looks at a plan and sees a flat sheet of paper with ink on it. The plan itself says
where the depth is: walls stand up towards a camera looking down, rooms are floor between them, and the
ground outside the building is farthest. `PlanDepth` reads walls, rooms and outside from the drawing and
paints them in the convention of SD depth ControlNets: near is bright, far is dark.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from workers.preprocessors.resize import fit_and_pad, resize_to_fit

WORK_PX = 1024
"""The plan's longer side while it is analysed. Plans are scaled to it, up or down, so that parameters in
pixels mean the same on a phone photo and a 300 dpi scan, and a huge scan costs no more than a small one."""

WALL, OUTSIDE = 255, 0
"""Depth values of wall tops (nearest) and of the ground outside the building (farthest)."""


class PlanDepth:
    """Walls bright, rooms as floor that falls away from their walls, outside black.

    Walls are the plan's thick dark strokes: ink (darker than `threshold`) that survives a morphological
    opening with a `wall_px` square, which erases thinner lines such as text, door leaves and arcs, window
    panes and dimension lines. Outside is what can be reached from the image border without crossing ink,
    once gaps in the ink narrower than `gap_px` (door openings in the outer wall) are closed. Everything
    else is floor: `rim` beside a wall, falling smoothly to `floor` at `falloff_px` from the nearest wall,
    which gives rooms the soft shading of a wall's height that a flat floor level alone would lack.

    The falloff is global, in pixels, not normalised per room: a small room then stays brighter than a
    large one, as it does from above, where normalising each room would make a closet look like a hall.
    Pixel parameters are measured with the plan scaled to `WORK_PX` on its longer side. Walls drawn as
    filled (poché) strokes are expected; walls drawn only as two thin outlines read as floor.
    """

    def __init__(
        self,
        threshold: int = 128,
        wall_px: int = 4,
        gap_px: int = 96,
        falloff_px: float = 48.0,
        floor: int = 96,
        rim: int = 176,
    ) -> None:
        """Defaults suit plans whose walls are at least 0.4% of the longer side thick, doors under 9% wide."""
        if not isinstance(threshold, int) or not 1 <= threshold <= 255:
            raise ValueError(f"threshold must be an integer from 1 to 255, got {threshold!r}")
        if not isinstance(wall_px, int) or not 1 <= wall_px <= 64:
            raise ValueError(f"wall_px must be an integer from 1 to 64, got {wall_px!r}")
        if not isinstance(gap_px, int) or not 0 <= gap_px <= WORK_PX // 2:
            raise ValueError(f"gap_px must be an integer from 0 to {WORK_PX // 2}, got {gap_px!r}")
        if not isinstance(falloff_px, (int, float)) or not 0 < falloff_px <= WORK_PX:
            raise ValueError(f"falloff_px must be a number in (0, {WORK_PX}], got {falloff_px!r}")
        # Strict bounds keep the three zones apart: floor never reads as outside, nor a rim as a wall.
        if not isinstance(floor, int) or not OUTSIDE < floor < WALL:
            raise ValueError(f"floor must be an integer from {OUTSIDE + 1} to {WALL - 1}, got {floor!r}")
        if not isinstance(rim, int) or not floor <= rim < WALL:
            raise ValueError(f"rim must be an integer from floor ({floor}) to {WALL - 1}, got {rim!r}")
        self.threshold = threshold
        self.wall_px = wall_px
        self.gap_px = gap_px
        self.falloff_px = float(falloff_px)
        self.floor = floor
        self.rim = rim

    def __call__(self, image: Image.Image, width: int, height: int) -> Image.Image:
        """The depth map of `image`, RGB and exactly width×height, padded with black (far)."""
        depth = self._depth(np.asarray(image.convert("L")))
        return Image.fromarray(fit_and_pad(depth, width, height, fill=OUTSIDE)).convert("RGB")

    def _depth(self, gray: np.ndarray) -> np.ndarray:
        """The depth map of a grayscale plan as uint8, at the plan's aspect with `WORK_PX` as its longer side."""
        if np.median(gray) < self.threshold:  # light lines on a dark sheet (a blueprint): ink is the minority
            gray = 255 - gray
        # Averaging while shrinking fades thin lines and keeps thick walls dark, which suits wall finding...
        work = resize_to_fit(gray, WORK_PX, WORK_PX)
        walls = self._walls(work < self.threshold)
        # ...but the outline that separates inside from outside must keep every line, however thin, or a
        # window drawn as two hairlines in a big scan becomes a hole the outside floods in through.
        ink = resize_to_fit((gray < self.threshold).astype(np.uint8) * 255, WORK_PX, WORK_PX) > 0
        inside = self._inside(ink, walls)

        # Distance to the nearest wall: zero on walls, and the size of the image where there are none.
        distance = cv2.distanceTransform((~walls).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        fall = np.clip(distance / self.falloff_px, 0.0, 1.0)
        # (1 - t)² eases into the floor level, so no crease shows where the falloff ends.
        floor = self.floor + (self.rim - self.floor) * (1.0 - fall) ** 2
        depth = np.where(inside, floor, OUTSIDE)
        depth[walls] = WALL
        return np.rint(depth).astype(np.uint8)

    def _walls(self, ink: np.ndarray) -> np.ndarray:
        kernel = np.ones((self.wall_px, self.wall_px), np.uint8)
        opened = cv2.morphologyEx(ink.astype(np.uint8), cv2.MORPH_OPEN, kernel)
        # Where thin strokes meet (letters, a door leaf on its arc) a square of wall size can still fit.
        # What is left there is a speck; a wall runs for several times its thickness.
        _, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
        longest = np.maximum(stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT])
        keep = longest >= 4 * self.wall_px
        keep[0] = False  # label 0 is the background
        return keep[labels]

    def _inside(self, ink: np.ndarray, walls: np.ndarray) -> np.ndarray:
        """Pixels within the building's outline; a region of ink holding no wall (a label) is not a building."""
        # A margin of open ground all round, as wide as the closing reaches: walls near the image edge are
        # closed as if the paper went on (not sealed to the edge), and the flood has one connected ring to
        # start from, whatever touches the border.
        reach = self.gap_px // 2
        margin = reach + 1
        outline = cv2.copyMakeBorder(ink.astype(np.uint8), margin, margin, margin, margin, cv2.BORDER_CONSTANT, value=0)
        if reach:
            # An odd side centres the square on each pixel; an even one would shift the outline by a pixel.
            kernel = np.ones((2 * reach + 1, 2 * reach + 1), np.uint8)
            outline = cv2.morphologyEx(outline, cv2.MORPH_CLOSE, kernel)
        mask = np.zeros((outline.shape[0] + 2, outline.shape[1] + 2), np.uint8)
        cv2.floodFill(outline, mask, (0, 0), 1, flags=4 | cv2.FLOODFILL_MASK_ONLY | (1 << 8))
        outside = mask[1 + margin : -1 - margin, 1 + margin : -1 - margin].astype(bool)
        count, labels = cv2.connectedComponents((~outside).astype(np.uint8), connectivity=8)
        has_wall = np.zeros(count, bool)
        has_wall[np.unique(labels[walls])] = True
        has_wall[0] = False  # label 0 is the outside
        return has_wall[labels]
