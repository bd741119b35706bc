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


def deidentify_batch(deid: Deidentifier, pairs: list) -> tuple[list, dict[str, str]]:
    """De-identify (item, dataset) pairs in place: (the de-identified pairs, SOP Instance UID -> why
    for those the profile refused). The delivery loop fails the refused ones at once with that
    reason (retrying cannot change the profile's answer)."""
    out, refused = [], {}
    for item, ds in pairs:
        try:
            out.append((item, deid.apply(ds)))
        except Refused as exc:
            uid = getattr(item, "sop_uid", "")
            log.error("not sent de-identified: %s", exc, extra={"sop_uid": uid})
            refused[uid] = f"not sent: de-identification refused it: {exc}"
    return out, refused
