"""Hostile cards, configs and de-id profiles: stated limits that were accepted and never applied,
NaN/inf numbers, keys written twice, and profile lines loaded but never used. Each is now refused
when the file loads (naming file and field) or checked when an input is assessed."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from node.config import ConfigError, load_settings
from node.deid.profile import ProfileError, load_profile
from node.models.card import CardError, InputSpec, ModelCard, load_card
from node.models.domain import InputFacts, domain_flags

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CARD = REPO / "models" / "hilum-ct-chest" / "card.yaml"


def _card_dict() -> dict:
    return yaml.safe_load(SHIPPED_CARD.read_text())


def _deploy(tmp_path: Path, card: dict | str) -> Path:
    """A model folder holding ``card`` (a dict, or YAML text) and a placeholder model file."""
    folder = tmp_path / "hilum-ct-chest"
    folder.mkdir(exist_ok=True)
    (folder / "card.yaml").write_text(card if isinstance(card, str) else yaml.safe_dump(card))
    (folder / "model.onnx").write_bytes(b"x")
    return folder


def _facts(body_region: str | None = "CHEST", **kw) -> InputFacts:
    values = dict(modality="CT", body_region=body_region, pixel_spacing_mm=(0.7, 0.7), slice_thickness_mm=1.0,
                  fov_mm=350.0, coverage_mm=300.0, plane="axial", tilt_deg=0.0, patient_position="HFS",
                  body_percentiles={5: -300.0, 25: 0.0, 50: 30.0, 75: 60.0, 95: 300.0})
    values.update(kw)
    return InputFacts(**values)


# -- 1. card limits that were stated but never checked -------------------------------------------

def test_card_percentile_that_is_never_measured_is_refused(tmp_path):
    card = _card_dict()
    card["validated_domain"]["intensity"]["percentiles"] = {10: {"min": -300, "max": -200}, 90: {"min": 0, "max": 100}}
    with pytest.raises(CardError, match=r"card\.yaml: validated_domain\.intensity\.percentiles: "
                                        r"percentiles \[10, 90\] are not measured"):
        load_card(_deploy(tmp_path, card))


def test_shipped_percentiles_are_all_measured_and_compared():
    card = ModelCard.model_validate(_card_dict())
    assert set(card.validated_domain.intensity.percentiles) <= {5, 25, 50, 75, 95}
    metal = _facts(body_percentiles={5: 900.0, 25: 1000.0, 50: 1100.0, 75: 1200.0, 95: 1500.0})
    assert [f.check for f in domain_flags(card, metal)] == ["intensity_out_of_domain"]


def test_card_body_regions_are_compared_upper_cased():
    raw = _card_dict()
    raw["validated_domain"]["body_regions"] = ["Chest", " thorax "]
    card = ModelCard.model_validate(raw)
    assert card.validated_domain.body_regions == ["CHEST", "THORAX"]
    assert not [f for f in domain_flags(card, _facts("CHEST")) if f.check == "body_region_out_of_domain"]
    assert [f.check for f in domain_flags(card, _facts("HEAD"))] == ["body_region_out_of_domain"]


def test_input_body_region_is_checked_when_the_domain_lists_no_regions():
    raw = _card_dict()
    raw["validated_domain"]["body_regions"] = []
    raw["input"]["body_region"] = "Chest"  # compared upper-cased, like BodyPartExamined
    card = ModelCard.model_validate(raw)
    flags = domain_flags(card, _facts("HEAD"))
    assert [(f.check, f.kind) for f in flags] == [("body_region_out_of_domain", "domain")]
    assert "body part HEAD, validated CHEST" in flags[0].reason
    assert domain_flags(card, _facts("CHEST")) == []
    assert domain_flags(card, _facts(None)) == []  # no BodyPartExamined: not flagged, as before


# -- 2. NaN / inf -----------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
NON_FINITE_CARDS = [
    (lambda c: c["input"].update(target_spacing=[NAN, 4.0, 4.0]), "input.target_spacing"),
    (lambda c: c["input"].update(target_spacing=[4.0, NAN, 4.0]), "input.target_spacing"),
    (lambda c: c["preprocessing"].update(mean=NAN), "preprocessing.ct_window.mean"),
    (lambda c: c["preprocessing"].update(clip=[NAN, 1000.0]), "preprocessing.ct_window.clip"),
    (lambda c: c["validated_domain"]["pixel_spacing_mm"].update(min=NAN), "validated_domain.pixel_spacing_mm.min"),
    (lambda c: c["validated_domain"]["intensity"].update(body_above=NAN), "validated_domain.intensity.body_above"),
    (lambda c: c["plausibility"]["labels"]["Heart"]["volume_ml"].update(max=INF),
     "plausibility.labels.Heart.volume_ml.max"),
]


@pytest.mark.parametrize("change,field", NON_FINITE_CARDS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(NON_FINITE_CARDS)])
def test_non_finite_card_numbers_are_refused_naming_the_field(tmp_path, change, field):
    card = _card_dict()
    change(card)
    with pytest.raises(CardError, match=rf"card\.yaml: {re.escape(field)}[.\d]*: Input should be a finite"):
        load_card(_deploy(tmp_path, card))


def test_target_spacing_check_itself_refuses_nan():
    # min()/max() skip a NaN that is not first; the check must not rely on allow_inf_nan alone.
    for bad in ((4.0, NAN, 4.0), (NAN, 4.0, 4.0), (4.0, 4.0, 0.0), (4.0, 4.0, 21.0)):
        with pytest.raises(ValueError, match="target_spacing"):
            InputSpec._positive(bad)
    assert InputSpec._positive((0.5, 1.0, 20.0)) == (0.5, 1.0, 20.0)


@pytest.mark.parametrize("field,value", [("handler_timeout_s", INF), ("delivery_backoff_s", INF),
                                         ("retrieve_backoff_s", NAN), ("stable_after", NAN)])
def test_non_finite_settings_are_refused(field, value):
    with pytest.raises(ConfigError, match=rf"{field}: Input should be a finite number"):
        load_settings(None, **{field: value})


@pytest.mark.parametrize("field,value,loc", [
    ("executor", {"worker_lost_s": INF}, r"executor\.worker_lost_s"),
    ("retention", {"check_every_s": INF}, r"retention\.check_every_s"),
    ("retention", {"results_days": NAN}, r"retention\.results_days"),
    ("sources", {"pacs": {"ae_title": "PACS", "host": "h", "port": 104, "timeout_s": NAN}}, r"sources\.pacs\.dimse\.timeout_s"),
])
def test_non_finite_nested_settings_are_refused(field, value, loc):
    with pytest.raises(ConfigError, match=rf"{loc}: Input should be a finite number"):
        load_settings(None, **{field: value})


def test_shipped_config_and_cards_still_load():
    assert load_settings(None).handler_timeout_s == 1800.0
    load_settings(REPO / "hilum.yaml")
    for folder in sorted((REPO / "models").iterdir()):
        if (folder / "card.yaml").is_file():
            load_card(folder)


# -- 3. keys written twice --------------------------------------------------------------------------

def test_card_key_written_twice_is_refused(tmp_path):
    text = SHIPPED_CARD.read_text()
    assert "  target_spacing: [4.0, 4.0, 4.0]\n" in text
    text = text.replace("  target_spacing: [4.0, 4.0, 4.0]\n",
                        "  target_spacing: [4.0, 4.0, 4.0]\n  target_spacing: [1.0, 1.0, 1.0]\n")
    line = text.splitlines().index("  target_spacing: [1.0, 1.0, 1.0]") + 1
    with pytest.raises(CardError, match=rf"card\.yaml: not valid YAML: key 'target_spacing' is written twice "
                                        rf"\(lines {line - 1} and {line}\)"):
        load_card(_deploy(tmp_path, text))


def test_config_key_written_twice_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hilum.yaml").write_text(
        "ae_title: HILUM\n"
        "destinations:\n"
        "  tps: {ae_title: TPS, host: 10.0.0.5, port: 104}\n"
        "stable_after: 30\n"
        "destinations:\n"
        "  research: {ae_title: RES, host: 10.0.0.9, port: 104}\n")
    with pytest.raises(ConfigError, match=r"hilum\.yaml: key 'destinations' is written twice \(lines 2 and 5\)"):
        load_settings("hilum.yaml")
    (tmp_path / "flow.yaml").write_text("destinations:\n  tps: {ae_title: TPS, host: h, port: 104, port: 105}\n")
    with pytest.raises(ConfigError, match=r"key 'port' is written twice \(lines 2 and 2\)"):
        load_settings("flow.yaml")


def test_yaml_merge_keys_still_override(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hilum.yaml").write_text(
        "destinations:\n"
        "  a: &peer {ae_title: A, host: h, port: 104}\n"
        "  b: {<<: *peer, ae_title: B}\n")
    dests = load_settings("hilum.yaml").destinations
    assert (dests["b"].ae_title, dests["b"].port) == ("B", 104)


# -- 4. de-identification profiles ------------------------------------------------------------------

def _key(tmp_path: Path) -> Path:
    key = tmp_path / "project.key"
    key.write_text("00" * 32)
    key.chmod(0o600)
    return key


def _dest(**deid) -> dict:
    return {"out": {"ae_title": "OUT", "host": "10.0.0.5", "port": 104, "deidentify": deid}}


def test_profile_contents_are_checked_with_the_settings(tmp_path):
    bad = tmp_path / "bad-profile.tsv"
    bad.write_text("(0010,0010)\tKEEP\tPatient Name\n")
    with pytest.raises(ConfigError, match=r"destinations\.out\.deidentify\.profile: .*bad-profile\.tsv:1: "
                                          r"action 'KEEP' is not one of"):
        load_settings(destinations=_dest(profile=str(bad), project_key_file=str(_key(tmp_path))))
    with pytest.raises(ConfigError, match=r"destinations\.out\.deidentify\.options: .*bad-profile\.tsv:1: action"):
        load_settings(destinations=_dest(options=[str(bad)], project_key_file=str(_key(tmp_path))))
    good = load_settings(destinations=_dest(options=["clean-descriptors"], project_key_file=str(_key(tmp_path))))
    assert good.destinations["out"].deidentify.options == ["clean-descriptors"]


def test_tag_written_twice_in_one_profile_file_is_refused(tmp_path):
    overlay = tmp_path / "overlay.tsv"
    overlay.write_text("# comment\n(0010,1000)\tX\tOther Patient IDs\n(0010,1000)\tK\ttypo\n")
    with pytest.raises(ProfileError, match=r"overlay\.tsv:3: tag \(0010,1000\) is already on line 2"):
        load_profile("basic", [str(overlay)])
    overlay.write_text("(0008,103E)\tK\tSeries Description\n(0008,103e)\tX\tagain, lower-case hex\n")
    with pytest.raises(ProfileError, match=r"overlay\.tsv:2: tag \(0008,103e\) is already on line 1"):
        load_profile("basic", [str(overlay)])
    overlay.write_text("(60xx,3000)\tK\tOverlay Data\nprivate\tX\tp\n(60xx,3000)\tX\tagain\nprivate\tK\tp\n")
    with pytest.raises(ProfileError, match=r"overlay\.tsv:3: tag \(60xx,3000\) is already on line 1"):
        load_profile("basic", [str(overlay)])
    # across files a later overlay replacing an earlier file's action is the point of overlays
    overlay.write_text("(0010,1000)\tK\tOther Patient IDs\n")
    assert load_profile("basic", [str(overlay)]).action(0x00101000) == "K"


def test_wildcard_for_a_private_group_is_refused_not_ignored(tmp_path):
    overlay = tmp_path / "overlay.tsv"
    overlay.write_text("(0029,xx10)\tK\tkeep this vendor attribute\n")
    with pytest.raises(ProfileError, match=r"overlay\.tsv:1: tag '\(0029,xx10\)' is in an odd \(private\) group"):
        load_profile("basic", [str(overlay)])
    # a pattern also matching even groups (the repeating groups, e.g. 60xx) still applies to them
    overlay.write_text("(60xx,4000)\tK\tOverlay Comments\n")
    assert load_profile("basic", [str(overlay)]).action(0x60024000) == "K"


def test_shipped_profiles_load():
    for options in ([], ["clean-descriptors"], ["retain-longitudinal-modified-dates"],
                    ["retain-patient-characteristics"]):
        assert load_profile("basic", options).private == "X"
