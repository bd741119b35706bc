"""/dicom-web/*: the only door to the archive (QIDO-RS, WADO-RS, STOW-RS).

Requests are authenticated here (session cookie or bearer token; any role reads, STOW-RS needs
the annotator or admin role) and forwarded to Orthanc's DICOMweb plugin with the node's own
credentials, which no user ever sees. Responses are streamed, so a large series never sits in
the node's memory; a STOW-RS body is counted while it streams and cut off past the limit.

The path must name a DICOMweb resource (``RESOURCE``): the gateway holds the archive's admin
credentials, so ``..``, an encoded ``?`` or Orthanc's own ``/dicom-web/servers`` client API must never
be reachable through it. The query string is passed on as the client sent it (parsing and
re-encoding it would turn ``*`` into ``%2A`` and drop repeated keys such as ``includefield``), after
a check of its characters and one normalisation, see ``upstream_query``.

Three more things are normalised on the way:
- Orthanc writes absolute BulkDataURIs from the request's ``Forwarded`` header; the gateway
  sets it to the browser's own host, so the URIs point back at this gateway, not at Orthanc.
- DICOMweb plugins before 1.16 answer 400 to a single-part ``Accept: application/octet-stream``
  (what OHIF asks for bulk data with ``singlepart: 'bulkdata'``). For those, the gateway asks
  for the multipart form and streams back the one part's body, with the part's content type.
- Compression is asked of the archive for JSON only (see ``proxy``).
"""
from __future__ import annotations

import asyncio
import logging
import re
from typing import AsyncIterator

import httpx
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from node.projects.store import ProjectStore
from node.web.auth import Principal, current_principal, require_store
from node.web.projects_api import record_labels, stow_labels

router = APIRouter(tags=["dicomweb"])
log = logging.getLogger("hilum.web")

# Request headers worth passing on; everything else (cookies, the user's Authorization) stays here.
FORWARD_REQUEST = ("accept", "content-type", "content-length", "accept-encoding")
FORWARD_RESPONSE = ("content-type", "content-length", "content-encoding", "etag", "last-modified")
SAFE_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
SINGLE_RESOURCE = re.compile(r"/(frames/\d+|bulk/[0-9A-Fa-f]{8}(/.*)?)$")
MULTIPART_OCTETS = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
FIXED_IN = (1, 16)  # DICOMweb plugin version that serves single-part octet-stream itself
# /studies, /series, /instances and what lies under them: UIDs, keywords, frame lists, bulk-data tags.
# Every segment starts with a letter or digit, so none is '.' or '..'.
RESOURCE = re.compile(r"(studies|series|instances)(/[A-Za-z0-9][A-Za-z0-9.,_\-]*)*")
# What a query may hold: RFC 3986 query characters, percent-escapes, and '^' '|' '\\' that DICOM
# values use and clients send unescaped. No space, '#', quote or control character: nothing that
# could end the query, start a fragment or break the request line.
QUERY_CHAR = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=:@/?^|\\]|%[0-9A-Fa-f]{2}")
QUERY = re.compile(rb"(?:" + QUERY_CHAR.pattern + rb")*")
ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
# Escapes sent on as the character itself. DICOMweb plugin 1.7 does not decode query values, so
# '%2A' would be a literal "%2A" to it, not a wildcard, and OHIF's 'includefield=00081030%2C00080060'
# would name no attribute. Unreserved characters mean the same either way (RFC 3986), and '*', '?',
# '^' and ',' mean the same to QIDO escaped or not, so an archive that does decode reads both alike.
# '&', '=', '+', '%' and space stay escaped: decoding them would change how the query splits.
AS_LITERAL = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~*?^,")


class TooLarge(Exception):
    pass


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3]) or (0,)


async def plugin_version(request: Request) -> tuple[int, ...]:
    """The archive's DICOMweb plugin version, asked once per process."""
    web = request.app.state.web
    if web.dicomweb_version is None:
        node = request.app.state.node
        try:
            r = await node.http_client.get(f"{node.archive.url}/plugins/dicom-web", timeout=5)
            web.dicomweb_version = _version(r.json().get("Version", "0")) if r.status_code == 200 else (0,)
        except (httpx.HTTPError, ValueError):
            return (0,)  # ask again next time; meanwhile assume the old behaviour
    return web.dicomweb_version


def upstream_path(path: str) -> str:
    """The resource path checked, or 404: only DICOMweb resources are forwarded."""
    if RESOURCE.fullmatch(path) is None:
        raise HTTPException(404, f"path: {path!r} is not a DICOMweb resource (studies, series or instances)")
    return path


def upstream_query(raw: bytes) -> bytes:
    """The query string as sent, characters checked (400 naming the first bad one), with the
    escapes of ``AS_LITERAL`` characters decoded."""
    if QUERY.fullmatch(raw) is None:
        pos = 0
        while (m := QUERY_CHAR.match(raw, pos)) is not None:
            pos = m.end()
        bad = raw[pos:pos + 3] if raw[pos:pos + 1] == b"%" else raw[pos:pos + 1]
        raise HTTPException(400, f"query: {ascii(bad.decode('latin-1'))} at position {pos} is not allowed "
                                 "(percent-encode it)")
    return ESCAPE.sub(lambda m: bytes([int(m[1], 16)]) if int(m[1], 16) in AS_LITERAL else m[0], raw)


def wants_json(accept: str) -> bool:
    return "json" in accept.lower()


def wants_single_part(accept: str) -> bool:
    kinds = [a.split(";")[0].strip().lower() for a in accept.split(",") if a.strip()]
    return bool(kinds) and all(k == "application/octet-stream" for k in kinds)


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise TooLarge
        yield chunk


class SinglePart:
    """Streams the body of the first part of a multipart/related response."""

    def __init__(self, stream: AsyncIterator[bytes], boundary: bytes) -> None:
        self.stream = stream
        self.delimiter = b"--" + boundary
        self.buffer = b""
        self.content_type = "application/octet-stream"

    async def start(self) -> None:
        """Read up to the end of the part's headers; keeps its Content-Type."""
        async for chunk in self.stream:
            self.buffer += chunk
            start = self.buffer.find(self.delimiter)
            end = self.buffer.find(b"\r\n\r\n", start) if start >= 0 else -1
            if end >= 0:
                head = self.buffer[start + len(self.delimiter):end].decode("latin-1")
                for line in head.split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-type":
                        self.content_type = value.strip()
                self.buffer = self.buffer[end + 4:]
                return
        raise ValueError("multipart response without a part")

    async def body(self) -> AsyncIterator[bytes]:
        closing = b"\r\n" + self.delimiter
        keep = len(closing)  # a delimiter split across chunks is still found
        async for chunk in self.stream:
            self.buffer += chunk
            cut = self.buffer.find(closing)
            if cut >= 0:
                yield self.buffer[:cut]
                return
            if len(self.buffer) > keep:
                yield self.buffer[:-keep]
                self.buffer = self.buffer[-keep:]
        cut = self.buffer.find(closing)
        yield self.buffer if cut < 0 else self.buffer[:cut]


def _boundary(content_type: str) -> bytes | None:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    return m.group(1).encode() if m else None


@router.api_route("/dicom-web/{path:path}", methods=["GET", "POST"])
async def proxy(path: str, request: Request, p: Principal = Depends(current_principal)):
    node = request.app.state.node
    url = httpx.URL(f"{node.archive.dicomweb_url}/{upstream_path(path)}")
    query = upstream_query(request.scope.get("query_string", b""))
    if query:
        url = url.copy_with(query=query)
    headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARD_REQUEST}
    # Raw bytes are passed through, so the archive may compress only what the client can read
    # (httpx would otherwise ask for gzip on every request), and only JSON: Orthanc gzips a
    # 512x512 CT frame in ~100 ms (bench/bench_web.py: 10 frames/s gzipped, ~100-160 plain).
    if not wants_json(headers.get("accept", "")):
        headers["accept-encoding"] = "identity"
    headers.setdefault("accept-encoding", "identity")
    host = request.headers.get("host", "")
    if SAFE_HOST.match(host):
        headers["forwarded"] = f"host={host};proto={request.url.scheme}"
    body = None
    labels = []
    if request.method == "POST":
        require_store(p)
        limit = node.settings.stow_max_mb * 1024 * 1024
        if int(request.headers.get("content-length") or 0) > limit:
            raise HTTPException(413, f"STOW-RS request larger than {node.settings.stow_max_mb} MB")
        body = _limited(request.stream(), limit)
        # A directory listing: off the event loop, which serves every other request meanwhile.
        if await asyncio.to_thread(ProjectStore.for_data_dir(node.settings.data_dir).names):
            # A SEG for a project case is checked before the archive stores it: read the body whole.
            try:
                body = b"".join([chunk async for chunk in body])
            except TooLarge:
                raise HTTPException(413, f"STOW-RS request larger than {node.settings.stow_max_mb} MB") from None
            labels = await stow_labels(request, body, p)
    unwrap = (request.method == "GET" and wants_single_part(headers.get("accept", ""))
              and SINGLE_RESOURCE.search("/" + path) is not None and await plugin_version(request) < FIXED_IN)
    if unwrap:
        headers["accept"] = MULTIPART_OCTETS
    client: httpx.AsyncClient = node.http_client
    upstream = client.build_request(request.method, url, headers=headers, content=body)
    try:
        try:
            resp = await client.send(upstream, stream=True)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            # A kept-alive connection the archive closed as the request went out: a read is safe to
            # send again, once, on a fresh connection (a STOW is not: it may have been stored).
            if request.method not in ("GET", "HEAD"):
                raise
            log.info("archive dropped a kept-alive connection (%s); sending the request again", type(exc).__name__)
            resp = await client.send(client.build_request(request.method, url, headers=headers), stream=True)
    except TooLarge:
        raise HTTPException(413, f"STOW-RS request larger than {node.settings.stow_max_mb} MB") from None
    except httpx.HTTPError as exc:
        raise HTTPException(502, f"archive unreachable: {type(exc).__name__}") from None
    if labels and resp.status_code == 200:  # every instance stored: the SEGs are the cases' labels now
        await record_labels(request, labels, p)
    out_headers = {k: v for k, v in resp.headers.items() if k.lower() in FORWARD_RESPONSE}
    out_headers["cache-control"] = "private, no-store"
    boundary = _boundary(resp.headers.get("content-type", ""))
    if unwrap and resp.status_code == 200 and boundary:
        part = SinglePart(resp.aiter_raw(), boundary)
        try:
            await part.start()
        except ValueError:
            await resp.aclose()
            raise HTTPException(502, "archive sent an empty multipart response") from None
        out_headers.pop("content-length", None)
        out_headers["content-type"] = part.content_type
        return StreamingResponse(part.body(), status_code=200, headers=out_headers,
                                 background=BackgroundTask(resp.aclose))
    return StreamingResponse(resp.aiter_raw(), status_code=resp.status_code, headers=out_headers,
                             background=BackgroundTask(resp.aclose))
