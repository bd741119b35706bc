"""/api/rules: the rules editor's API over the RulesService.

Viewers read everything (files, validation, explain, simulate, history, diffs); only admins
change the rule set (save, delete, revert). A refused change answers 422 with every problem
found, each naming its file, line and field, so the editor can show them next to the text.
"""
from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field

from node.route.router import series_facts
from node.rules.errors import RuleError, RuleErrors
from node.rules.facts import StudyFacts
from node.rules.loader import is_rule_file_name, read_rule_files
from node.rules.ruleset import RuleSet
from node.rules.simulate import simulate
from node.web.auth import Principal, require_admin, require_viewer, who

router = APIRouter(prefix="/api/rules", tags=["rules"])
MAX_RULE_FILE_CHARS = 256 * 1024
NOT_UTF8 = "the file is not UTF-8 text"  # the loader's words for it


class FileText(BaseModel):
    text: str = Field(max_length=MAX_RULE_FILE_CHARS)
    message: str = Field("", max_length=500)


class Proposal(BaseModel):
    """Changes laid over the current rules directory: name -> new text, or null to delete."""
    files: dict[str, str | None] = Field(default_factory=dict)


class ExplainRequest(Proposal):
    study_uid: str = Field(min_length=1, max_length=64)


def _service(request: Request):
    return request.app.state.node.rules


def _refused(errors) -> HTTPException:
    return HTTPException(422, {"message": "the rules were refused", "errors": [e.to_dict() for e in errors]})


def _limited(request: Request) -> dict[str, list[str]]:
    """The modalities of each destination that takes only some (its config's ``modalities``)."""
    return {name: d.modalities for name, d in request.app.state.node.settings.destinations.items() if d.modalities}


def _rule_view(rule, only: dict[str, list[str]]) -> dict:
    return {"name": rule.name, "description": rule.description, "file": rule.file, "line": rule.line,
            "level": rule.level, "order": rule.order, "enabled": rule.enabled, "exclusive": rule.exclusive,
            "fallback": rule.fallback, "action": rule.action.describe(only),
            "handler": rule.action.handler, "destinations": list(rule.action.destinations)}


def _proposed_ruleset(request: Request, files: dict[str, str | None]) -> RuleSet:
    """The rule set the proposal would make (the active one when it is empty); 422 if invalid."""
    service = _service(request)
    if not files:
        return service.current()
    errors = service.validate(files)
    if errors:
        raise _refused(errors)
    merged = read_rule_files(service.rules_dir)
    for name, text in files.items():
        if text is None:
            merged.pop(name, None)
        else:
            merged[name] = text
    return RuleSet.from_files(merged, handlers=service.handlers, destinations=service.destinations,
                              sources=service.sources)


def _check_name(name: str) -> None:
    if not is_rule_file_name(name):
        raise HTTPException(422, f"rule file name {name!r}: a plain name ending in .yaml or .yml, "
                                 "not starting with a dot")


@router.get("")
def overview(request: Request, _: Principal = Depends(require_viewer)) -> dict:
    service = _service(request)
    active = service.current()
    latest = service.store.latest()
    return {"version": latest.version if latest else None, "files": sorted(active.files),
            "rules": [_rule_view(r, _limited(request)) for r in active.rules],
            "directory_errors": [e.to_dict() for e in service.errors]}


def _read(path: Path) -> tuple[str | None, RuleError | None]:
    """The rule file's text, or why it cannot be read (in the loader's words)."""
    try:
        return path.read_text(encoding="utf-8"), None
    except UnicodeDecodeError:
        return None, RuleError(path.name, None, None, NOT_UTF8)
    except OSError as exc:
        return None, RuleError(path.name, None, None, f"cannot read the file: {exc.strerror or exc}")


def _latest(service) -> dict | None:
    latest = service.store.latest()
    return latest and {"version": latest.version, "digest": latest.digest}


@router.get("/files/{name}")
def get_file(name: str, request: Request, _: Principal = Depends(require_viewer)) -> dict:
    _check_name(name)
    # This one file, not the whole directory: one unreadable file (say latin-1, saved by another editor)
    # must not make every file unreadable here, and is itself answered 422 naming it, not 500.
    path = _service(request).rules_dir / name
    if not path.is_file():
        raise HTTPException(404, f"no rule file {name!r}")
    text, problem = _read(path)
    if problem is not None:
        raise HTTPException(422, {"message": f"rule file {name!r} cannot be read", "errors": [problem.to_dict()]})
    return {"name": name, "text": text}


@router.put("/files/{name}")
def put_file(name: str, body: FileText, request: Request, p: Principal = Depends(require_admin)) -> dict:
    _check_name(name)
    try:
        version = _service(request).apply_change({name: body.text}, who(p), body.message)
    except RuleErrors as exc:
        raise _refused(exc.errors) from None
    return {"name": name, "version": version}


@router.delete("/files/{name}")
def delete_file(name: str, request: Request, p: Principal = Depends(require_admin)) -> dict:
    _check_name(name)
    service = _service(request)
    path = service.rules_dir / name
    if path.is_file() and (problem := _read(path)[1]) is not None and problem.message == NOT_UTF8:
        # The service lays a change over the directory's content and cannot read this file, so without this
        # a file that is not UTF-8 could not be removed through the API at all. Removing it is what the
        # admin would do by hand: its text is in no rules version (the directory is refused whole while it
        # is there), and reload() loads the rest as the directory watcher would (validated; the active
        # rules stay if it is refused). The deletion itself is audited, as every admin change of the rules.
        before = _latest(service)
        path.unlink()
        service.reload()
        after = _latest(service)
        service.audit.rules_changed(who(p), f"deleted {name} ({problem.message})", before=before, after=after)
        return {"name": name, "deleted": True, "version": after and after["version"]}
    try:
        version = service.apply_change({name: None}, who(p), f"deleted {name}")
    except RuleErrors as exc:
        raise _refused(exc.errors) from None
    return {"name": name, "deleted": True, "version": version}


@router.post("/validate")
def validate(body: Proposal, request: Request, _: Principal = Depends(require_viewer)) -> dict:
    errors = _service(request).validate(body.files)
    return {"valid": not errors, "errors": [e.to_dict() for e in errors]}


@router.post("/explain")
def explain(body: ExplainRequest, request: Request, _: Principal = Depends(require_viewer)) -> dict:
    """Why each rule (active, or as proposed) does or does not match each series of a stored study."""
    index = request.app.state.node.index
    rows = index.series_of_study(body.study_uid)
    if not rows:
        raise HTTPException(404, f"study {body.study_uid} not found")
    ruleset = _proposed_ruleset(request, body.files)
    series = [series_facts(r) for r in rows]
    explanations = [ruleset.explain_series(s) for s in series]
    explanations.append(ruleset.explain_study(StudyFacts(series, body.study_uid)))
    return {"study_uid": body.study_uid, "explanations": [e.to_dict() for e in explanations]}


@router.post("/simulate")
def simulate_change(body: Proposal, request: Request, since_days: float = Query(30, gt=0, le=3650),
                    _: Principal = Depends(require_viewer)) -> dict:
    """Replay the proposal over the series received in the last ``since_days`` days."""
    proposed = _proposed_ruleset(request, body.files)
    index = request.app.state.node.index
    facts = [series_facts(r) for r in index.all_series(time.time() - since_days * 86400)]
    report = simulate(_service(request).current(), proposed, facts)
    return {"since_days": since_days, **report.to_dict(), "text": report.text()}


@router.get("/history")
def history(request: Request, _: Principal = Depends(require_viewer)) -> dict:
    return {"versions": [v.to_dict() for v in reversed(_service(request).history())]}


@router.get("/history/{version}")
def version_detail(version: int, request: Request, _: Principal = Depends(require_viewer)) -> dict:
    service = _service(request)
    try:
        return {"version": version, "files": service.version_files(version), "diff": service.diff(version)}
    except KeyError:
        raise HTTPException(404, f"no rules version {version}") from None


@router.post("/history/{version}/revert")
def revert(version: int, request: Request, p: Principal = Depends(require_admin)) -> dict:
    service = _service(request)
    try:
        new = service.revert(version, who(p))
    except KeyError:
        raise HTTPException(404, f"no rules version {version}") from None
    except RuleErrors as exc:
        raise _refused(exc.errors) from None
    return {"reverted_to": version, "version": new}
