"""Quality flags: a handler reports a failed plausibility/domain check, the node refuses the job by
default, or delivers with the warning in every object when the rule says deliver_with_warnings."""
from __future__ import annotations

import textwrap
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydantic import BaseModel, ConfigDict

from node.handler_api import Handler, HandlerInput, HandlerRefusal, register
from node.jobs.quality import QualityPolicy
from node.jobs.worker import JobSpec, run_job
from node.phantom import generate_ct
from node.results import LabelMap, Measurement, MeasurementGroup, MeasurementReport, QualityFlag, Segment, \
    Code, ImageSeries
from node.rules.ruleset import RuleSet
from node.store.vault import Vault
from tests.iod import assert_valid_iod

LUNG = Segment(label=1, name="Lung", category=Code("91723000", "SCT", "Anatomical Structure"),
               type=Code("39607008", "SCT", "Lung"), tg263="Lungs")


@register
class FlaggingHandler(Handler):
    """Test-only: a box label map, a report, an SC, and the flags its params ask for."""

    name = "test-flagging"
    version = "1"
    sr_template = "ct-anatomy"

    def assess_input(self, inp: HandlerInput) -> list:
        if self.params.model_dump().get("domain"):
            return [QualityFlag("slice_thickness_out_of_domain", "slice thickness 5 mm, validated 0.5-2.5 mm",
                                kind="domain")]
        return []

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        flag: bool = False
        domain: bool = False
        coverage: bool = False

    def run(self, inp, progress):
        vol = inp.primary.volume
        labels = np.zeros(vol.geometry.shape, np.uint8)
        labels[:, 10:20, 10:20] = 1
        out = [
            LabelMap(inp.primary.series_uid, vol.geometry, labels, (LUNG,), description="Test lungs"),
            MeasurementReport(inp.primary.series_uid, "ct-anatomy", (
                MeasurementGroup("Lung_L", "lung_left", (Measurement("volume", 1000.0, "ml"),)),)),
            ImageSeries(inp.primary.series_uid, "Test overview", np.zeros((1, 16, 16), np.uint8)),
        ]
        if self.params.flag:
            out.append(QualityFlag("lung_slice_gap", "Lung_L absent on 12 of 24 slices between present ones "
                                   "(threshold 0)", structure="Lung_L"))
        if self.params.coverage:
            out.append(QualityFlag("lung_truncated", "Lung_L is cut by the scan: its volume is that of the part "
                                   "scanned", kind="coverage", structure="Lung_L"))
        return out


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return generate_ct(tmp_path_factory.mktemp("qct") / "study", seed=5, rows=48, cols=48, slices=12,
                       pixel_spacing=6.0, slice_thickness=5.0)


def _spec(ct, tmp_path, params, options) -> JobSpec:
    vault = Vault(tmp_path / "data", None)
    return JobSpec(job_id=1, job_key="quality-test", study_uid=ct.study_uid, rule="r", handler="test-flagging",
                   params=params, series={ct.series_uid: [str(p) for p in ct.series_files()]},
                   results_dir=str(tmp_path / "data" / "results"), vault=vault.spec(), options=options)


def _read(meta, tmp_path):
    vault = Vault(tmp_path / "data", None)
    return [pydicom.dcmread(BytesIO(vault.read_file(Path(m["path"])))) for m in meta]


def test_a_failed_check_refuses_the_job_by_default(ct, tmp_path):
    with pytest.raises(HandlerRefusal) as exc:
        run_job(_spec(ct, tmp_path, {"flag": True}, {}), lambda f, m: None)
    assert "lung_slice_gap" in str(exc.value) and "Lung_L" in str(exc.value) and "nothing delivered" in str(exc.value)
    assert not (tmp_path / "data" / "results" / "1").exists() or not any((tmp_path / "data" / "results" / "1").iterdir())


def test_out_of_domain_input_is_refused_before_the_handler_runs(ct, tmp_path):
    with pytest.raises(HandlerRefusal) as exc:
        run_job(_spec(ct, tmp_path, {"domain": True}, {"on_quality_failure": "refuse"}), lambda f, m: None)
    assert "the input failed 1 quality check" in str(exc.value) and "slice thickness" in str(exc.value)


def test_deliver_with_warnings_marks_every_object(ct, tmp_path):
    meta, provenance, _ = run_job(_spec(ct, tmp_path, {"flag": True, "domain": True},
                                     {"on_quality_failure": "deliver_with_warnings"}), lambda f, m: None)
    warnings = provenance["quality_warnings"]
    assert len(warnings) == 2 and any("lung_slice_gap" in w for w in warnings)
    objs = _read(meta, tmp_path)
    assert {o.Modality for o in objs} >= {"SEG", "RTSTRUCT", "SR"}
    for o in objs:
        assert o.SeriesDescription.startswith("AI WARNING:"), o.SeriesDescription
        assert_valid_iod(o)
    rt = next(o for o in objs if o.Modality == "RTSTRUCT")
    assert "lung_slice_gap" in rt.StructureSetDescription and "slice thickness" in rt.StructureSetDescription
    seg = next(o for o in objs if o.Modality == "SEG")
    assert "WARNING" in seg.ContentDescription
    sr = next(o for o in objs if o.Modality == "SR")
    texts = []

    def walk(items):
        for it in items:
            if it.ValueType == "TEXT":
                texts.append(it.TextValue)
            walk(it.get("ContentSequence", []))
    walk(sr.ContentSequence)
    assert sum("QUALITY WARNING" in t for t in texts) == 2
    sc = next(o for o in objs if o.SOPClassUID.startswith("1.2.840.10008.5.1.4.1.1.7"))
    assert "lung_slice_gap" in sc.ImageComments


def test_a_coverage_flag_never_refuses_and_is_written_into_every_object(ct, tmp_path):
    """A lung cut by the scan range is measured right for what was scanned: delivered under the
    default policy (refuse), with the warning in every object; a failed check beside it still refuses."""
    meta, provenance, _ = run_job(_spec(ct, tmp_path, {"coverage": True}, {}), lambda f, m: None)
    assert [w for w in provenance["quality_warnings"] if "lung_truncated" in w]
    for o in _read(meta, tmp_path):
        assert o.SeriesDescription.startswith("AI WARNING:"), o.SeriesDescription
    with pytest.raises(HandlerRefusal) as exc:
        run_job(_spec(ct, tmp_path / "2", {"coverage": True, "flag": True}, {}), lambda f, m: None)
    assert "failed 1 quality check(s)" in str(exc.value) and "lung_truncated" not in str(exc.value)


def test_without_flags_nothing_is_marked(ct, tmp_path):
    meta, provenance, _ = run_job(_spec(ct, tmp_path, {}, {"on_quality_failure": "deliver_with_warnings"}),
                               lambda f, m: None)
    assert "quality_warnings" not in provenance
    assert not any("WARNING" in o.SeriesDescription for o in _read(meta, tmp_path))


def test_policy_and_flag_validation():
    with pytest.raises(ValueError, match="on_quality_failure"):
        QualityPolicy({"on_quality_failure": "maybe"})
    with pytest.raises(ValueError, match="check"):
        QualityFlag("Bad Name", "x")
    with pytest.raises(ValueError, match="kind"):
        QualityFlag("ok", "x", kind="vibes")


def test_rule_field_is_validated_and_reaches_the_action():
    from node.handler_api import get_handler
    files = {"r.yaml": textwrap.dedent("""\
        - name: warn
          match: {Modality: CT}
          handler: overview
          destinations: [orthanc]
          on_quality_failure: deliver_with_warnings
        """)}
    rs = RuleSet.from_files(files, handlers=get_handler, destinations=["orthanc"])
    assert rs.rule("warn").action.on_quality_failure == "deliver_with_warnings"
    assert "delivered with warnings" in rs.rule("warn").action.describe()
    from node.rules.errors import RuleErrors
    bad = {"r.yaml": files["r.yaml"].replace("deliver_with_warnings", "sometimes")}
    with pytest.raises(RuleErrors) as exc:
        RuleSet.from_files(bad, handlers=get_handler, destinations=["orthanc"])
    assert "on_quality_failure" in str(exc.value)


def test_job_view_shows_the_warnings_of_the_latest_run():
    from node.web.views import quality_warnings
    history = [{"event": "created"}, {"event": "done", "provenance": {"quality_warnings": ["old"]}},
               {"event": "retry"}, {"event": "done", "provenance": {"quality_warnings": ["a", "b"]}}]
    assert quality_warnings(history) == ["a", "b"]
    assert quality_warnings([{"event": "done", "provenance": {}}]) == []
