"""Loader (naming schemes, RAS, labels, config) and case-level label CSVs, on real tiny NIfTI files."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nifti_factory import RAS, SHAPE, las, make_case, volumes, write_nifti
from omegaconf import OmegaConf

from aldm_fed.data.brats import (
    MODALITIES,
    SCHEMES,
    DataConfig,
    DataError,
    detect_scheme,
    find_cases,
    harmonise_labels,
    load_case,
    read_nifti,
)
from aldm_fed.data.case_labels import CaseLabelError, group_labels, read_case_labels

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# --------------------------------------------------------------------------------------------
# Naming schemes and round trips
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("scheme", "case_id", "kwargs"),
    [
        ("brats2021", "BraTS2021_00000", {}),
        ("brats2023", "BraTS-GLI-00000-000", {"float_images": True}),
        ("ucsf-pdgm", "UCSF-PDGM-0004", {"extra_axis": True}),
        ("brats2021", "BraTS20_Training_001", {"ext": ".nii"}),
    ],
)
def test_round_trip_each_scheme(tmp_path, scheme, case_id, kwargs):
    make_case(tmp_path / "COHORT" / "A", case_id, scheme, **kwargs)
    (cf,) = find_cases(tmp_path / "COHORT")
    assert cf.case_id == case_id  # UCSF: "_nifti" dropped
    assert cf.scheme.name == scheme
    assert cf.group == "A"
    assert cf.missing == []
    assert detect_scheme(cf.folder).name == scheme

    loaded = load_case(cf, ["t1", "t2", "flair"])
    imgs, seg = volumes()
    assert loaded.image.shape == (3, *SHAPE) and loaded.image.dtype == np.float32
    for i, m in enumerate(["t1", "t2", "flair"]):
        np.testing.assert_array_equal(loaded.image[i], imgs[m].astype(np.float32))
    assert loaded.seg.dtype == np.uint8
    np.testing.assert_array_equal(loaded.seg, seg)  # legacy 4 came back as 3
    np.testing.assert_allclose(loaded.affine, RAS)
    assert loaded.spacing == (1.0, 1.0, 1.0)
    assert loaded.modalities == ("t1", "t2", "flair")


def test_legacy_label_4_becomes_3(tmp_path):
    folder = make_case(tmp_path, "BraTS2021_00001", "brats2021")
    raw = np.asanyarray(nib.load(folder / "BraTS2021_00001_seg.nii.gz").dataobj)
    assert set(np.unique(raw)) == {0, 1, 2, 4}
    loaded = load_case(find_cases(tmp_path)[0])
    assert set(np.unique(loaded.seg)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(loaded.seg == 3, raw == 4)


def test_harmonise_rejects_labels_outside_scheme():
    with pytest.raises(DataError, match=r"label value\(s\) \[3\] not in scheme 'brats2021'") as exc:
        harmonise_labels(np.array([0, 1, 3], dtype=np.uint8), "brats2021", "x_seg.nii.gz")
    assert exc.value.code == "bad-label" and "x_seg.nii.gz" in str(exc.value)
    with pytest.raises(DataError, match="non-integer"):
        harmonise_labels(np.array([0.0, 1.5]), "brats2023")
    np.testing.assert_array_equal(harmonise_labels(np.array([0.0, 4.0]), "ucsf-pdgm"), [0, 3])


def test_las_file_comes_back_ras_with_marker_in_place(tmp_path):
    """A marker written at LAS voxel (0, 5, 6) must land at RAS voxel (X-1, 5, 6), same world point."""
    data = np.zeros(SHAPE, np.int16)
    data[0, 5, 6] = 999
    aff = las()
    path = write_nifti(tmp_path / "m.nii.gz", data, aff)
    vol = read_nifti(path)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    (idx,) = np.argwhere(vol.data == 999)
    assert tuple(idx) == (SHAPE[0] - 1, 5, 6)
    np.testing.assert_allclose(vol.affine @ [*idx, 1], aff @ [0, 5, 6, 1])


def test_las_case_equals_ras_case(tmp_path):
    make_case(tmp_path / "r", "BraTS-GLI-00001-000")
    make_case(tmp_path / "l", "BraTS-GLI-00001-000", affine=las())
    a = load_case(find_cases(tmp_path / "r")[0])
    b = load_case(find_cases(tmp_path / "l")[0])
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.seg, b.seg)
    np.testing.assert_allclose(a.affine, b.affine)


def test_brats2018_hgg_lgg_layout_and_group_labels(tmp_path):
    root = tmp_path / "MICCAI_BraTS_2018"
    make_case(root / "HGG", "Brats18_CBICA_AAB_1", "brats2021", ext=".nii")
    make_case(root / "LGG", "Brats18_TCIA09_141_1", "brats2021", ext=".nii")
    (root / "survival_data.csv").write_text("BraTS18ID,Age\n")
    cases = find_cases(root)
    assert [c.case_id for c in cases] == ["Brats18_CBICA_AAB_1", "Brats18_TCIA09_141_1"]
    assert [c.group for c in cases] == ["HGG", "LGG"]
    assert group_labels(cases) == {"Brats18_CBICA_AAB_1": {"grade": "HGG"}, "Brats18_TCIA09_141_1": {"grade": "LGG"}}


def test_detect_scheme_ties_and_forced_scheme(tmp_path):
    imgs, _ = volumes()
    up = tmp_path / "X_nifti"
    low = tmp_path / "Y"
    for m, suffix in (("t1", "T1"), ("flair", "FLAIR")):
        write_nifti(up / f"X_{suffix}.nii.gz", imgs[m])
    for m in ("t1", "flair"):
        write_nifti(low / f"Y_{m}.nii.gz", imgs[m])
    assert detect_scheme(up).name == "ucsf-pdgm"
    assert detect_scheme(low).name == "brats2021"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no NIfTI file named like any known scheme"):
        detect_scheme(tmp_path / "empty")
    assert find_cases(tmp_path, "brats2023") == []
    # A forced scheme accepts other letter case (X_T1 read as brats2021 t1; no "_nifti" stripping).
    assert [c.case_id for c in find_cases(tmp_path, "brats2021")] == ["X_nifti", "Y"]
    assert [c.case_id for c in find_cases(tmp_path)] == ["X", "Y"]
    assert {c.missing[0] for c in find_cases(tmp_path)} == {"t1c"}
    with pytest.raises(ValueError, match="unknown naming scheme"):
        find_cases(tmp_path, "brats1999")


def test_missing_modality_and_4d_volume_raise_clear_errors(tmp_path):
    folder = make_case(tmp_path, "BraTS-GLI-00002-000", modalities=("t1", "t2"))
    (cf,) = find_cases(tmp_path)
    assert cf.missing == ["t1c", "flair"]
    with pytest.raises(DataError, match=r"no modality flair file \(expected BraTS-GLI-00002-000-t2f.nii.gz") as exc:
        load_case(cf, ["t1", "flair"])
    assert exc.value.code == "missing-modality"
    load_case(cf, ["t1", "t2"])  # the modalities it has are fine

    four_d = write_nifti(folder / "BraTS-GLI-00002-000-t2w.nii.gz", np.zeros((*SHAPE, 2), np.int16))
    with pytest.raises(DataError, match=r"not a 3D volume") as exc:
        read_nifti(four_d)
    assert exc.value.path == four_d


def test_hidden_and_unrelated_files_are_ignored(tmp_path):
    folder = make_case(tmp_path / "A", "BraTS-GLI-00003-000")
    (folder / "._BraTS-GLI-00003-000-t1n.nii.gz").write_bytes(b"\0junk")  # macOS resource fork
    (folder / "notes.txt").write_text("x")
    (tmp_path / ".cache" / "BraTS-GLI-00009-000").mkdir(parents=True)
    write_nifti(tmp_path / ".cache" / "BraTS-GLI-00009-000" / "BraTS-GLI-00009-000-t1n.nii.gz", volumes()[0]["t1"])
    (cf,) = find_cases(tmp_path)
    assert cf.duplicates == {}
    load_case(cf)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=600), gz=st.booleans(), ext=st.sampled_from([".nii.gz", ".nii"]))
def test_random_bytes_always_give_data_error_naming_the_file(tmp_path, blob, gz, ext):
    path = tmp_path / f"BraTS-GLI-00000-000-t1n{ext}"
    path.write_bytes(gzip.compress(blob) if gz else blob)
    with pytest.raises(DataError) as exc:
        read_nifti(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_valid_header_gives_data_error(tmp_path, keep):
    """A real header followed by too little data (.nii and .nii.gz) is unreadable, not a crash."""
    folder = make_case(tmp_path, "BraTS2021_00009", "brats2021", ext=".nii")
    for path in (folder / "BraTS2021_00009_t1.nii", write_nifti(tmp_path / "x.nii.gz", volumes()[0]["t2"])):
        raw = path.read_bytes()
        path.write_bytes(raw[: max(400, int(len(raw) * keep))])
        with pytest.raises(DataError) as exc:
            read_nifti(path)
        assert exc.value.code == "unreadable" and exc.value.path == path


def test_corrupt_header_with_huge_shape_is_refused(tmp_path):
    path = write_nifti(tmp_path / "x_t1.nii", np.zeros((4, 4, 4), np.int16))
    raw = bytearray(path.read_bytes())
    raw[42:48] = np.array([30000, 30000, 30000], dtype="<i2").tobytes()  # dim[1..3] of the NIfTI-1 header
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="implausible volume shape"):
        read_nifti(path)


def test_truncated_gzip_gives_data_error(tmp_path):
    folder = make_case(tmp_path, "BraTS-GLI-00004-000")
    path = folder / "BraTS-GLI-00004-000-t2f.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="unreadable or truncated") as exc:
        read_nifti(path)
    assert exc.value.code == "unreadable" and exc.value.path == path


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

def test_default_yaml_matches_dataconfig_defaults():
    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / "data" / "default.yaml"))
    assert DataConfig.from_cfg(raw) == DataConfig()
    assert set(raw) == set(DataConfig.__dataclass_fields__)


def test_aldm_preset_composes():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS / "data"), version_base="1.3"):
        cfg = compose(config_name="aldm")
    GlobalHydra.instance().clear()
    dc = DataConfig.from_cfg(cfg)
    assert (dc.modalities, dc.crop, dc.fit, dc.size, dc.margin) == (("t1", "t2", "flair"), "tumour", "pad", 112, 10)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"modalities": ["t1", "dwi"]}, "unknown modality"),
        ({"crop": "skull"}, "data.crop"),
        ({"fit": "stretch"}, "data.fit"),
        ({"clip": [99, 1]}, "data.clip"),
        ({"spacing": [1, 0, 1]}, "data.spacing"),
        ({"size": 1}, "data.size"),
        ({"scheme": "brats1999"}, "unknown naming scheme"),
    ],
)
def test_dataconfig_rejects_bad_values(override, match):
    with pytest.raises(ValueError, match=match):
        DataConfig.from_cfg(override)


def test_schemes_cover_all_modalities():
    for s in SCHEMES.values():
        assert set(s.suffixes) == set(MODALITIES)
        assert s.label_map[0] == 0 and max(s.label_map.values()) == 3


# --------------------------------------------------------------------------------------------
# Case-level labels
# --------------------------------------------------------------------------------------------

def test_ucsf_three_digit_csv_ids_match_four_digit_folders(tmp_path):
    csv = tmp_path / "UCSF-PDGM-metadata_v2.csv"
    csv.write_text("ID,Sex,WHO CNS Grade,IDH\nUCSF-PDGM-004,M,4,wildtype\nUCSF-PDGM-005,F,2,mutant\n"
                   "UCSF-PDGM-999,F,3,NA\n")
    ids = ["UCSF-PDGM-0004", "UCSF-PDGM-0005", "UCSF-PDGM-0007"]
    labels = read_case_labels(csv, case_ids=ids, columns=["WHO CNS Grade", "IDH"])
    assert labels.id_column == "ID"
    assert dict(labels) == {"UCSF-PDGM-0004": {"WHO CNS Grade": "4", "IDH": "wildtype"},
                            "UCSF-PDGM-0005": {"WHO CNS Grade": "2", "IDH": "mutant"}}
    assert labels.missing == ["UCSF-PDGM-0007"]
    assert labels.unmatched == ["UCSF-PDGM-999"]
    assert labels.values_of("IDH") == {"UCSF-PDGM-0004": "wildtype", "UCSF-PDGM-0005": "mutant"}


def test_id_column_auto_detected_by_matches(tmp_path):
    """BraTS 2020 name_mapping.csv has several id columns; the one matching the folders wins."""
    csv = tmp_path / "name_mapping.csv"
    csv.write_text("Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,BraTS_2020_subject_ID\n"
                   "HGG,Brats17_CBICA_AAB_1,Brats18_CBICA_AAB_1,BraTS20_Training_001\n"
                   "LGG,Brats17_TCIA_101_1,Brats18_TCIA_101_1,BraTS20_Training_002\n")
    labels = read_case_labels(csv, case_ids=["BraTS20_Training_001", "BraTS20_Training_002"])
    assert labels.id_column == "BraTS_2020_subject_ID"
    assert labels["BraTS20_Training_002"]["Grade"] == "LGG"
    rsna = tmp_path / "train_labels.csv"
    rsna.write_text("BraTS21ID;MGMT_value\n00000;1\n2;0\n")  # semicolons, numeric ids
    labels = read_case_labels(rsna, case_ids=["BraTS2021_00000", "BraTS2021_00002"])
    assert dict(labels) == {"BraTS2021_00000": {"MGMT_value": "1"}, "BraTS2021_00002": {"MGMT_value": "0"}}


def test_label_csv_errors_name_the_file(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("case_id,site,grade\nPH-A-0000,A,HGG\n")
    with pytest.raises(CaseLabelError, match=r"labels.csv: no column\(s\) \['idh'\]"):
        read_case_labels(csv, columns=["idh"])
    with pytest.raises(CaseLabelError, match=r"labels.csv: no id column 'subject'"):
        read_case_labels(csv, id_column="subject")
    with pytest.raises(CaseLabelError, match="not found"):
        read_case_labels(tmp_path / "nope.csv")
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\x00\xff\xfe" * 50)
    with pytest.raises(CaseLabelError, match="bin.csv: not a text CSV"):
        read_case_labels(binary)
    noid = tmp_path / "noid.csv"
    noid.write_text("grade,age\nHGG,50\n")
    with pytest.raises(CaseLabelError, match="noid.csv: no id column found"):
        read_case_labels(noid)
    clash = tmp_path / "clash.csv"
    clash.write_text("case_id,grade\nX,HGG\nX,LGG\n")
    with pytest.raises(CaseLabelError, match="appears twice"):
        read_case_labels(clash)
    assert read_case_labels(csv)["PH-A-0000"] == {"site": "A", "grade": "HGG"}
