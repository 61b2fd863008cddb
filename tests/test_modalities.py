import pytest

from sgma.modalities import (
    Modality,
    all_patterns,
    canonical_pattern,
    mask_to_pattern,
    parse_pattern,
    pattern_mask,
    resolve_patterns,
)

MODS = ("rgb", "nir", "dsm")


def test_all_patterns_order_and_count():
    assert all_patterns(MODS) == ["rgb", "nir", "dsm", "rgb+nir", "rgb+dsm", "nir+dsm", "rgb+nir+dsm"]
    for m in range(1, 6):
        patterns = all_patterns([f"m{i}" for i in range(m)])
        assert len(patterns) == 2**m - 1
        assert len(set(patterns)) == len(patterns)


def test_parse_is_canonical():
    assert parse_pattern("dsm+rgb", MODS) == ("rgb", "dsm")
    assert parse_pattern(["nir", "rgb"], MODS) == ("rgb", "nir")
    assert canonical_pattern(" dsm + rgb ", MODS) == "rgb+dsm"


def test_mask_roundtrip():
    for p in all_patterns(MODS):
        assert mask_to_pattern(pattern_mask(p, MODS), MODS) == p
    assert pattern_mask("rgb+dsm", MODS) == (True, False, True)


def test_unknown_modality_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown modality 'sar'.*rgb, nir, dsm"):
        parse_pattern("rgb+sar", MODS)


@pytest.mark.parametrize("bad", ["", "+", "rgb+", [], "  "])
def test_empty_pattern(bad):
    with pytest.raises(ValueError, match="empty modality pattern"):
        parse_pattern(bad, MODS)


def test_duplicates_rejected():
    with pytest.raises(ValueError, match="twice"):
        parse_pattern("rgb+rgb", MODS)
    with pytest.raises(ValueError, match="more than once"):
        resolve_patterns(["rgb", "rgb"], MODS)


def test_resolve_patterns():
    assert resolve_patterns("all", MODS) == all_patterns(MODS)
    assert resolve_patterns(None, MODS) == all_patterns(MODS)
    assert resolve_patterns("dsm+rgb,nir", MODS) == ["rgb+dsm", "nir"]
    with pytest.raises(ValueError, match="empty"):
        resolve_patterns([], MODS)


def test_mask_without_modality():
    with pytest.raises(ValueError, match="no available modality"):
        mask_to_pattern((False, False, False), MODS)


def test_modality_validation():
    Modality("rgb", 3, (0.0,) * 3, (1.0,) * 3)
    with pytest.raises(ValueError, match="lowercase"):
        Modality("RGB", 3, (0.0,) * 3, (1.0,) * 3)
    with pytest.raises(ValueError, match="3 channels"):
        Modality("rgb", 3, (0.0,), (1.0,) * 3)
    with pytest.raises(ValueError, match="positive"):
        Modality("dsm", 1, (0.0,), (0.0,))
