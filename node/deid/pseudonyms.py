"""Keyed pseudonyms: the same original and project key give the same pseudonym, at every site,
every time; without the key nobody can compute or reverse them (HMAC-SHA256)."""
from __future__ import annotations

import hashlib
import hmac

from pydicom.uid import UID_dictionary

MAX_DATE_SHIFT_DAYS = 3650


class Pseudonyms:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._key, f"{purpose}\x1f{value}".encode(), hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """A 2.25 UID for an instance/series/study/frame UID; registered DICOM UIDs (SOP classes,
        well-known frames of reference...) identify nothing and stay as they are."""
        uid = uid.strip().rstrip("\x00")
        if not uid or uid in UID_dictionary:
            return uid
        return "2.25." + str(int.from_bytes(self._mac("uid", uid)[:16], "big"))

    def patient(self, patient_id: str) -> str:
        return "PSN-" + self._mac("patient", patient_id).hex()[:20].upper()

    def date_shift_days(self, patient_id: str) -> int:
        """How many days this patient's dates move back (1..3650): intervals between the
        patient's studies survive, calendar dates do not."""
        return 1 + int.from_bytes(self._mac("dates", patient_id)[:4], "big") % MAX_DATE_SHIFT_DAYS
