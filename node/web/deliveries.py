"""/api/deliveries: every copy the node sends (results and forwarded originals), and admin retries."""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from node.web.auth import Principal, require_admin, require_viewer
from node.web.views import delivery_view

router = APIRouter(prefix="/api/deliveries", tags=["deliveries"])
STATUSES = ("pending", "delivered", "failed")


@router.get("")
def list_deliveries(request: Request, status: str | None = Query(None), limit: int = Query(200, ge=1, le=1000),
                    _: Principal = Depends(require_viewer)) -> dict:
    if status is not None and status not in STATUSES:
        raise HTTPException(422, f"status must be one of {', '.join(STATUSES)}")
    index = request.app.state.node.index
    return {"deliveries": [delivery_view(d) for d in index.deliveries(status=status, limit=limit)]}


@router.post("/{delivery_id}/retry")
def retry(delivery_id: int, request: Request, _: Principal = Depends(require_admin)) -> dict:
    node = request.app.state.node
    row = node.index.delivery(delivery_id)
    if row is None:
        raise HTTPException(404, f"delivery {delivery_id} not found")
    if row["status"] != "failed":
        raise HTTPException(409, f"delivery {delivery_id} is {row['status']}, only a failed delivery is retried")
    node.index.retry_deliveries(delivery_id=delivery_id)
    node.delivery.wake()
    return {"delivery": delivery_id, "action": "re-queued"}
