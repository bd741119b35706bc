"""De-identification (PS3.15 Annex E) for export: profiles as data, keyed pseudonyms,
burned-in annotation refusal."""
from __future__ import annotations

import logging

from node.deid.apply import Deidentifier, Refused, burned_in_reason
from node.deid.profile import Profile, ProfileError, load_profile
from node.keyfile import read_key

__all__ = ["Deidentifier", "Profile", "ProfileError", "Refused", "burned_in_reason", "deidentify_batch",
           "from_config", "load_profile"]

log = logging.getLogger("hilum.deid")


def from_config(cfg) -> Deidentifier:
    """A Deidentifier from a destination's ``deidentify`` settings; errors name the field."""
    try:
        profile = load_profile(cfg.profile, cfg.options)
    except ProfileError as exc:
        raise ValueError(f"deidentify.profile: {exc}") from None
    key = read_key(cfg.project_key_file, "deidentify.project_key_file")
    return Deidentifier(profile, key, frozenset(cfg.allow_burned_in))


def deidentify_batch(deid: Deidentifier, pairs: list) -> list:
    """De-identify (item, dataset) pairs in place; refused ones are logged and left out, so the
    delivery loop records them as not accepted (with retries, then failed)."""
    out = []
    for item, ds in pairs:
        try:
            out.append((item, deid.apply(ds)))
        except Refused as exc:
            log.error("not sent de-identified: %s", exc, extra={"sop_uid": getattr(item, "sop_uid", "")})
    return out
