"""Post-processing's components, labelled a slab at a time, are those of the whole mask."""
import numpy as np
import pytest
from scipy import ndimage

from node.models.components import components_to_drop

FULL = np.ones((3, 3, 3), bool)


def _whole(mask, min_voxels, largest_only):
    """What post-processing did before: one ndimage.label of the whole mask."""
    comp, n = ndimage.label(mask, structure=FULL)
    if not n:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
    keep = sizes >= min_voxels
    if largest_only:
        keep &= np.arange(n) == int(np.argmax(sizes))
    return np.concatenate([[False], ~keep])[comp]


def _sliced(mask, min_voxels, largest_only):
    out = np.zeros(mask.shape, bool)
    for slab, drop in components_to_drop(mask, min_voxels, largest_only):
        assert drop.shape == mask[slab].shape
        out[slab] = drop
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("density", [0.05, 0.2, 0.35])
def test_same_components_as_one_label_of_the_whole_mask(seed, density):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 140)), int(rng.integers(1, 40)), int(rng.integers(1, 40)))
    mask = rng.random(shape) < density  # speckle and, denser, components winding across many slabs
    for min_voxels, largest in ((0, False), (1, False), (3, False), (40, False), (0, True), (5, True)):
        expected = _whole(mask, min_voxels, largest)
        assert np.array_equal(_sliced(mask, min_voxels, largest), expected), (shape, min_voxels, largest)


def test_components_joined_only_diagonally_across_a_slab_boundary():
    mask = np.zeros((64, 5, 5), bool)
    mask[:32, 1, 1] = True  # slab 0 ends at (31, 1, 1) ...
    mask[32:, 2, 2] = True  # ... slab 1 starts at (32, 2, 2): a corner neighbour
    mask[10, 4, 4] = True  # a speckle
    dropped = _sliced(mask, min_voxels=2, largest_only=False)
    assert dropped.sum() == 1 and dropped[10, 4, 4]
    assert not _sliced(mask, 0, largest_only=True)[:, 1:3, 1:3].any()  # one component of 64 voxels


def test_largest_among_equals_is_the_first_in_raster_order():
    mask = np.zeros((70, 4, 9), bool)
    mask[40:50, 1, 1] = True  # 10 voxels, later
    mask[5:15, 1, 7] = True  # 10 voxels, first in raster order
    kept = mask & ~_sliced(mask, 0, largest_only=True)
    assert kept[5:15, 1, 7].all() and not kept[40:50].any()
    assert np.array_equal(kept, mask & ~_whole(mask, 0, True))


def test_empty_mask_drops_nothing():
    assert list(components_to_drop(np.zeros((40, 3, 3), bool), 5, True)) == []
