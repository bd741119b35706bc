"""/api/models: model versions and their states, shadow agreement, and admin state changes.

Reading is for every role; promote / shadow / retire are for admins and audited. A change is a file
written under the data directory, so the next job a worker takes runs the new active version.
"""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Request

from node.models.shadow import agreement_summary
from node.models.versions import ModelRegistry, RegistryError, change_state
from node.web.auth import Principal, require_admin, require_viewer, who

router = APIRouter(prefix="/api/models", tags=["models"])


def _registry(request: Request) -> ModelRegistry:
    return ModelRegistry.for_data_dir(request.app.state.node.settings.data_dir)


def _model_view(registry: ModelRegistry, name: str) -> dict:
    try:
        versions = [i.view() for i in registry.versions(name)]
    except RegistryError as exc:
        raise HTTPException(422, str(exc)) from None
    if not versions:
        raise HTTPException(404, f"no model named {name!r}")
    try:
        active = registry.resolve(name).version
    except KeyError:  # every version retired and none shipped: rules naming it are refused
        active = None
    shadows = sorted({r["shadow_version"] for r in registry.agreements(name)} |
                     {v["version"] for v in versions if v["state"] == "shadow"})
    return {"model": name, "handler": f"model:{name}", "active": active, "versions": versions,
            "shadow_agreement": {v: agreement_summary(registry.agreements(name, v)) for v in shadows}}


@router.get("")
def list_models(request: Request, _: Principal = Depends(require_viewer)) -> dict:
    registry = _registry(request)
    return {"models": [_model_view(registry, n) for n in registry.names()]}


@router.get("/{name}")
def get_model(name: str, request: Request, _: Principal = Depends(require_viewer)) -> dict:
    return _model_view(_registry(request), name)


@router.get("/{name}/versions/{version}/agreement")
def agreement(name: str, version: str, request: Request, _: Principal = Depends(require_viewer)) -> dict:
    """Every comparison of the shadow version with the active one, case by case, and the summary."""
    registry = _registry(request)
    try:
        records = registry.agreements(name, version)
    except RegistryError as exc:
        raise HTTPException(422, str(exc)) from None
    return {"model": name, "version": version, "summary": agreement_summary(records), "cases": records}


@router.post("/{name}/versions/{version}/{action}")
def set_state(name: str, version: str, action: Literal["promote", "shadow", "retire"], request: Request,
              p: Principal = Depends(require_admin)) -> dict:
    node = request.app.state.node
    try:
        return change_state(_registry(request), node.audit, name, version, action, who(p))
    except RegistryError as exc:
        raise HTTPException(409, str(exc)) from None
    except KeyError as exc:
        raise HTTPException(409, str(exc.args[0])) from None
