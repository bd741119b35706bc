"""/dicom-web/*: the only door to the archive (QIDO-RS, WADO-RS, STOW-RS).

Requests are authenticated here and forwarded to Orthanc's DICOMweb plugin with the node's own
credentials, which no user ever sees. Responses are streamed, so a large series never sits in
the node's memory.
"""
from __future__ import annotations

import httpx
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from node.web.auth import current_role

router = APIRouter(tags=["dicomweb"])

# Request headers worth passing on; everything else (cookies, the user's Authorization) stays here.
FORWARD_REQUEST = ("accept", "content-type", "content-length", "accept-encoding")
FORWARD_RESPONSE = ("content-type", "content-length", "content-encoding", "etag", "last-modified")
MAX_STOW_BYTES = 4 * 1024**3


@router.api_route("/dicom-web/{path:path}", methods=["GET", "POST"])
async def proxy(path: str, request: Request, role: str = Depends(current_role)):
    node = request.app.state.node
    if request.method == "POST":
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_STOW_BYTES:
            raise HTTPException(413, f"STOW-RS request larger than {MAX_STOW_BYTES} bytes")
    client: httpx.AsyncClient = node.http_client
    headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARD_REQUEST}
    url = f"{node.archive.dicomweb_url}/{path}"
    body = request.stream() if request.method == "POST" else None
    upstream = client.build_request(request.method, url, params=request.query_params, headers=headers,
                                    content=body)
    try:
        resp = await client.send(upstream, stream=True)
    except httpx.HTTPError as exc:
        raise HTTPException(502, f"archive unreachable: {type(exc).__name__}") from None
    out_headers = {k: v for k, v in resp.headers.items() if k.lower() in FORWARD_RESPONSE}
    return StreamingResponse(resp.aiter_raw(), status_code=resp.status_code, headers=out_headers,
                             background=BackgroundTask(resp.aclose))
