"""Classification tasks: slice labels from a hand-made mask, the volume task, label mapping, the
leakage guards, and items read from a real cache folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aldm_fed.data.cache import CaseCache, write_cached_case, write_index
from aldm_fed.evaluation.tasks import (
    CaseItem,
    check_no_leakage,
    check_real_test_items,
    encode_case_labels,
    items_from_cache,
    make_task,
    slice_labels,
    slice_task,
    training_groups,
    volume_task,
)

S = 8


def item(group: str, tumour_slices: tuple[int, ...] = (3, 5), *, synthetic: bool = False,
         label: int | None = None, source: str | None = None) -> CaseItem:
    """An 8^3 two-channel volume; brain fills axial slices 1..6; tumour voxels in `tumour_slices`."""
    image = np.zeros((2, S, S, S), dtype=np.float32)
    image[:, 2:6, 2:6, 1:7] = 0.5
    seg = np.zeros((S, S, S), dtype=np.uint8)
    for k in tumour_slices:
        seg[3, 4, k] = 2 if k % 2 else 1  # one voxel of any tumour label marks the slice
    image[0, :, :, :] += np.arange(S, dtype=np.float32) / 100  # slice k is recognisable by its value
    return CaseItem(image=image, seg=seg, group=group, synthetic=synthetic, label=label,
                    source_groups=(source,) if source else ())


def test_slice_labels_from_a_hand_made_mask() -> None:
    seg = np.zeros((S, S, S), dtype=np.uint8)
    seg[1, 2, 3] = 1
    seg[7, 7, 5] = 3
    assert slice_labels(seg).tolist() == [0, 0, 0, 1, 0, 1, 0, 0]
    assert slice_labels(seg, axis=0).tolist() == [0, 1, 0, 0, 0, 0, 0, 1]
    assert slice_labels(np.zeros((S, S, S))).sum() == 0


def test_slice_task_keeps_patient_per_slice_and_cuts_the_right_slice() -> None:
    task = slice_task([item("P1"), item("P2", (4,))])
    assert len(task) == 2 * S and task.spatial_dims == 2 and task.sample_shape == (2, S, S)
    assert task.labels[:S].tolist() == [0, 0, 0, 1, 0, 1, 0, 0]
    assert task.labels[S:].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    assert task.groups.tolist() == ["P1"] * S + ["P2"] * S
    assert task.class_counts() == (13, 3) and task.n_groups == 2
    batch = task.inputs([3, S + 4])
    assert batch.shape == (2, 2, S, S) and batch.dtype == np.float32
    assert batch[0, 0, 0, 0] == pytest.approx(0.03) and batch[1, 0, 0, 0] == pytest.approx(0.04)
    np.testing.assert_array_equal(batch[1], task.items[1].image[:, :, :, 4])


def test_slice_task_drops_near_empty_slices() -> None:
    # Brain (image > 0 once the slice marker is removed) covers slices 1..6, 16/64 = 25 % each.
    it = item("P1")
    it.image[0] -= np.arange(S, dtype=np.float32) / 100
    task = slice_task([it], min_brain_fraction=0.2)
    assert task.refs[:, 1].tolist() == [1, 2, 3, 4, 5, 6]
    assert task.labels.tolist() == [0, 0, 1, 0, 1, 0]
    assert len(slice_task([it], min_brain_fraction=0.3)) == 0
    # An explicit brain mask wins over the image.
    brain = np.zeros((S, S, S), dtype=np.uint8)
    brain[:, :, 3] = 1
    with_brain = CaseItem(image=it.image, seg=it.seg, brain=brain, group="P1")
    assert slice_task([with_brain], min_brain_fraction=0.5).refs[:, 1].tolist() == [3]


def test_volume_task_and_label_mapping() -> None:
    codes = encode_case_labels({"P1": "HGG", "P2": "LGG"}, {"HGG": 1, "LGG": 0})
    assert codes == {"P1": 1, "P2": 0}
    task = volume_task([item("P1", label=codes["P1"]), item("P2", label=codes["P2"])])
    assert task.labels.tolist() == [1, 0] and task.spatial_dims == 3
    assert task.inputs([1]).shape == (1, 2, S, S, S)
    assert make_task("volume", task.items).labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match="case label"):
        volume_task([item("P1")])
    with pytest.raises(ValueError, match=r"not in label_map.*P3"):
        encode_case_labels({"P3": "GBM"}, {"HGG": 1, "LGG": 0})
    with pytest.raises(ValueError, match=r"no label for \['P4'\]"):
        encode_case_labels({"P4": None}, {"HGG": 1, "LGG": 0})
    with pytest.raises(ValueError, match="unknown task"):
        make_task("pixel", task.items)


def test_case_item_validation() -> None:
    image = np.zeros((1, S, S, S), dtype=np.float32)
    with pytest.raises(ValueError, match="seg shape"):
        CaseItem(image=image, seg=np.zeros((S, S, 4)), group="P1")
    with pytest.raises(ValueError, match="label must be 0, 1"):
        CaseItem(image=image, group="P1", label=2)
    with pytest.raises(ValueError, match=r"\(C, S, S, S\)"):
        CaseItem(image=image[0], group="P1")
    with pytest.raises(ValueError, match="source_group"):
        CaseItem(image=image, group="P1", source_groups=("P0",))
    with pytest.raises(ValueError, match="tuple of patient ids"):
        CaseItem(image=image, group="S1", synthetic=True, source_groups="P0")  # a str is not a tuple
    with pytest.raises(ValueError, match="tumour mask"):
        slice_task([CaseItem(image=image, group="P1")])


def test_leakage_guard_names_the_patients() -> None:
    check_no_leakage(["P1", "P1", "P2"], ["P3", "P3"])
    with pytest.raises(ValueError, match=r"patient leakage: 1 patient\(s\).*P2"):
        check_no_leakage(["P1", "P1", "P2", "P2"], ["P2", "P3"])
    many = [f"P{i}" for i in range(15)]
    with pytest.raises(ValueError, match="15 patient.*and 5 more"):
        check_no_leakage(many, many)


def test_follow_up_scans_are_one_patient_for_the_bootstrap_and_the_leakage_guard() -> None:
    first, follow_up = "BraTS-GLI-00124-000", "BraTS-GLI-00124-001"
    task = slice_task([item(first), item(follow_up), item("BraTS-GLI-00200-000")])
    assert set(task.groups.tolist()) == {"BraTS-GLI-00124", "BraTS-GLI-00200"} and task.n_groups == 2
    assert volume_task([item(first, label=0), item(follow_up, label=1)]).n_groups == 1
    # A synthetic volume keeps its own id as its group.
    assert slice_task([item("BraTS-GLI-00999-000", synthetic=True)]).groups[0] == "BraTS-GLI-00999-000"
    with pytest.raises(ValueError, match="patient leakage.*BraTS-GLI-00124"):
        check_no_leakage([first], [follow_up])
    with pytest.raises(ValueError, match="BraTS-GLI-00124"):  # through a synthetic volume's host
        check_no_leakage(training_groups([item("syn-0", synthetic=True, source=first)]), [follow_up])


def test_synthetic_source_patients_count_as_training_patients() -> None:
    items = [item("P1"), item("syn-0", synthetic=True, source="P9")]
    assert training_groups(items) == {"P1", "syn-0", "P9"}
    with pytest.raises(ValueError, match="P9"):
        check_no_leakage(training_groups(items), ["P9"])


def test_synthetic_test_items_refused() -> None:
    check_real_test_items([item("P1")])
    with pytest.raises(ValueError, match=r"synthetic item\(s\) passed as test data: \['syn-0'\]"):
        check_real_test_items([item("P1"), item("syn-0", synthetic=True)])


def test_items_from_a_cache_folder(tmp_path: Path) -> None:
    src = item("P1")
    for cid in ("P1", "P2"):
        write_cached_case(tmp_path, cid, src.image, src.seg, (src.image[0] > 0).astype(np.uint8),
                          {"modalities": ["t1", "flair"], "affine": np.eye(4).tolist(), "prep_hash": "h"})
    write_index(tmp_path, {"prep_hash": "h", "modalities": ["t1", "flair"], "size": S, "cases": ["P1", "P2"]})
    items = items_from_cache(CaseCache(tmp_path), ["P1", "P2"], labels={"P1": 1, "P2": 0})
    assert [(it.group, it.label, it.synthetic) for it in items] == [("P1", 1, False), ("P2", 0, False)]
    assert slice_task(items).labels.sum() == 4
    with pytest.raises(ValueError, match="no entry in labels"):
        items_from_cache(CaseCache(tmp_path), ["P1"], labels={})


def test_a_case_made_again_under_its_id_has_another_content_key(tmp_path: Path) -> None:
    # Same id, same preprocessing hash, other voxels (a cohort made again with another profile or
    # seed): run identities must tell them apart, or a finished run of the old volumes is read back.
    src = item("P1")
    keys = []
    for name, image in (("old", src.image), ("again", src.image), ("new", src.image * 0.5)):
        write_cached_case(tmp_path / name, "P1", image, src.seg, (src.image[0] > 0).astype(np.uint8),
                          {"modalities": ["t1", "flair"], "affine": np.eye(4).tolist(), "prep_hash": "h"})
        write_index(tmp_path / name, {"prep_hash": "h", "modalities": ["t1", "flair"], "size": S, "cases": ["P1"]})
        keys.append(items_from_cache(CaseCache(tmp_path / name), ["P1"])[0].content_key)
    assert keys[0] == keys[1] != keys[2] and keys[0].startswith("prep:h:")
