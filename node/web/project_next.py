"""/api/projects/{name}/next: the case an annotator should open now, as an OHIF address.

The learning loop's hand-off to the viewer. The next case is the head of the annotation queue (by the
asked strategy); without predictions yet, the first unlabeled case. OHIF opens it in segmentation mode with
the current model's prediction as the initial series, so the annotator corrects the AI's SEG instead of
painting from nothing, and the SEG they save comes back through the gateway as the case's next label
version (which records the prediction it started from).

The prediction's series is looked up in the archive by its SOP Instance UID: the project keeps only the
instance (the job's result), and the archive is the one place that knows where it is stored now.
"""
from __future__ import annotations

import asyncio
from urllib.parse import urlencode

import httpx
from fastapi import APIRouter, Depends, HTTPException, Query, Request

from node.models.uncertainty import STRATEGIES, CaseScore, rank_cases
from node.web.auth import Principal, require_viewer
from node.web.projects_api import _store, _visible

router = APIRouter(prefix="/api/projects", tags=["projects"])
SERIES_UID = "0020000E"


def pick_next(cases: dict[str, dict], strategy: str, seed: int) -> tuple[str, str] | None:
    """(study UID, why) of the case to annotate next, or None when every case is labeled or in review."""
    scored = [CaseScore(uid, c["prediction"]["uncertainty"]["score"],
                        tuple(c["prediction"]["uncertainty"].get("features", ())))
              for uid, c in cases.items()
              if c["state"] == "predicted" and (c.get("prediction") or {}).get("uncertainty")]
    if scored:
        top = rank_cases(scored, strategy, 1, seed)[0]
        return top.case, top.reason
    for uid, c in cases.items():  # predicted without an uncertainty, then never predicted: in project order
        if c["state"] == "predicted":
            return uid, "predicted (no uncertainty recorded)"
    for uid, c in cases.items():
        if c["state"] == "unlabeled":
            return uid, "unlabeled, no prediction yet: annotate from scratch"
    return None


async def prediction_series(request: Request, study_uid: str, sop_uid: str) -> str | None:
    """The series of the prediction's SEG in the archive; None if the archive no longer has it."""
    node = request.app.state.node
    url = f"{node.archive.dicomweb_url}/studies/{study_uid}/instances"
    try:
        r = await node.http_client.get(url, params={"SOPInstanceUID": sop_uid},
                                       headers={"Accept": "application/dicom+json"})
    except httpx.HTTPError as exc:
        raise HTTPException(502, f"archive unreachable: {type(exc).__name__}") from None
    if r.status_code in (204, 404) or (r.status_code == 200 and not r.content):
        return None
    if r.status_code != 200:
        raise HTTPException(502, f"archive answered HTTP {r.status_code} to an instance search in study {study_uid}")
    found = [i[SERIES_UID]["Value"][0] for i in r.json() if SERIES_UID in i]
    return found[0] if found else None


@router.get("/{name}/next")
async def next_case(name: str, request: Request, strategy: str = Query("uncertainty"), seed: int = Query(0),
                    p: Principal = Depends(require_viewer)) -> dict:
    """The next case to annotate with the OHIF address that opens it, the prediction pre-loaded."""
    if strategy not in STRATEGIES:
        raise HTTPException(422, f"strategy: must be one of {', '.join(STRATEGIES)}")
    store = _store(request)

    def visible_cases() -> dict[str, dict]:
        # The check of every other project endpoint (404, or 403 with the refusal audited): a user left
        # off a restricted project must not be handed its cases here either.
        _visible(request, store, name, p)
        return store.cases(name)

    # This endpoint is async (it awaits the archive): file reads go to a thread, not the event loop.
    cases = await asyncio.to_thread(visible_cases)
    picked = pick_next(cases, strategy, seed)
    if picked is None:
        return {"project": name, "case": None, "reason": "every case is labeled or in review"}
    study_uid, reason = picked
    case = cases[study_uid]
    prediction = case.get("prediction") or {}
    query = {"StudyInstanceUIDs": study_uid}
    series = None
    if prediction.get("seg_sop_uid"):
        series = await prediction_series(request, study_uid, prediction["seg_sop_uid"])
        if series:
            # OHIF's SEG hanging protocol puts a SEG in the viewport, which loads (hydrates) it for editing;
            # the initial series names which SEG when the study has several (earlier labels, other models).
            query.update(hangingProtocolId="@ohif/seg", initialSeriesInstanceUID=series)
    return {"project": name, "case": study_uid, "state": case["state"], "reason": reason,
            "prediction": ({"model_version": prediction.get("model_version"), "seg_sop_uid": prediction["seg_sop_uid"],
                            "seg_series_uid": series} if prediction.get("seg_sop_uid") else None),
            "viewer_url": "/segmentation?" + urlencode(query)}
