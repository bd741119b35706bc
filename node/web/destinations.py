"""/api/destinations: where results go, which callers may send, and a C-ECHO test per destination."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, HTTPException, Request
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.web.auth import Principal, require_admin, require_viewer

router = APIRouter(prefix="/api/destinations", tags=["destinations"])
ECHO_TIMEOUT_S = 5


@router.get("")
def list_destinations(request: Request, _: Principal = Depends(require_viewer)) -> dict:
    node = request.app.state.node
    s = node.settings
    return {
        "node": {"ae_title": s.ae_title, "dicom_port": s.dicom_port},
        "archive": {"name": "orthanc", "type": "orthanc", "url": node.archive.url,
                    "managed": node.managed is not None},
        "destinations": [{"name": name, "type": d.type, "ae_title": d.ae_title, "host": d.host, "port": d.port,
                          "calling_ae_title": d.calling_ae_title or s.ae_title}
                         for name, d in sorted(s.destinations.items())],
        "allowed_callers": [{"ae_title": c.ae_title, "host": c.host} for c in s.allowed_callers],
        "accepts_any_caller": not s.allowed_callers,
    }


def c_echo(calling_ae: str, ae_title: str, host: str, port: int) -> dict:
    """One C-ECHO; the outcome in words, never an exception."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = ECHO_TIMEOUT_S
    start = time.monotonic()
    assoc = ae.associate(host, port, ae_title=ae_title)
    try:
        if not assoc.is_established:
            why = ("association rejected" if assoc.is_rejected else
                   "association aborted" if assoc.is_aborted else "no answer (connection refused or timed out)")
            return {"ok": False, "detail": f"{why} by {ae_title}@{host}:{port}"}
        status = assoc.send_c_echo()
        code = getattr(status, "Status", None)
        ok = code == 0x0000
        detail = "C-ECHO success" if ok else (f"C-ECHO status 0x{code:04X}" if code is not None
                                              else "no C-ECHO response")
        return {"ok": ok, "detail": detail, "ms": round((time.monotonic() - start) * 1000, 1)}
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


@router.post("/{name}/echo")
def echo(name: str, request: Request, _: Principal = Depends(require_admin)) -> dict:
    node = request.app.state.node
    if name == "orthanc":
        start = time.monotonic()
        ok = node.archive_alive()
        return {"name": name, "ok": ok, "detail": "archive answers" if ok else "archive does not answer",
                "ms": round((time.monotonic() - start) * 1000, 1)}
    dest = node.settings.destinations.get(name)
    if dest is None:
        raise HTTPException(404, f"no destination named {name!r}")
    return {"name": name, **c_echo(dest.calling_ae_title or node.settings.ae_title, dest.ae_title, dest.host,
                                   dest.port)}
