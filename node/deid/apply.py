"""Applying a profile to a dataset: every attribute the profile lists gets its action, at every
depth (sequences are walked), and the result says how it was de-identified.

UIDs become keyed pseudonyms everywhere they occur, so a SEG, SR or RTSTRUCT de-identified with
the same project key still references the de-identified images. UID attributes the table does
not list are mapped too, unless they hold vocabulary (SOP classes, transfer syntaxes, coding
schemes) or a registered DICOM UID: an instance UID in any attribute could lead back.
"""
from __future__ import annotations

import datetime as dt
import re

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from node.deid.profile import Profile
from node.deid.pseudonyms import Pseudonyms

SC_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4"})
DUMMY_TEXT = "ANONYMIZED"
DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y", "IS": "0", "DS": "0",
         "UR": "", "US": 0, "UL": 0, "SS": 0, "SL": 0, "FL": 0.0, "FD": 0.0, "UV": 0, "SV": 0, "AT": 0,
         "OB": b"\x00\x00", "OW": b"\x00\x00", "UN": b"\x00\x00", "OD": b"\x00" * 8, "OF": b"\x00" * 4,
         "OL": b"\x00" * 4, "OV": b"\x00" * 8}
TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "PN", "CS", "AE"})
VOCABULARY_UIDS = frozenset({"CodingSchemeUID", "ContextUID", "ContextGroupExtensionCreatorUID", "MappingResourceUID",
                             "PrivateInformationCreatorUID", "CreatorVersionUID", "SegmentationTemplateUID",
                             "RetrieveLocationUID", "RepositoryUniqueID", "HomeCommunityID", "SelectorUIValue"})
# Values from the original that must not survive in cleaned free text.
IDENTIFYING = ("PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
               "PatientMotherBirthName", "PatientBirthDate", "PatientAddress", "PatientTelephoneNumbers",
               "AccessionNumber", "StudyID", "AdmissionID", "InstitutionName", "InstitutionAddress",
               "InstitutionalDepartmentName", "ReferringPhysicianName", "PerformingPhysicianName",
               "OperatorsName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "RequestingPhysician",
               "StationName", "DeviceSerialNumber")
METHOD = "Hilum PS3.15 Annex E"


class Refused(Exception):
    """This instance must not leave the site de-identified (e.g. text burned into the pixels)."""


def burned_in_reason(ds: Dataset, allowed: frozenset[str]) -> str | None:
    """Why the pixels may carry identifying text, or None. ``allowed``: modalities (or ``SC`` for
    Secondary Capture) a rule lets through regardless."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return None
    modality = str(ds.get("Modality", "") or "").upper()
    kinds = {modality} | ({"SC"} if str(ds.get("SOPClassUID", "")) in SC_SOP_CLASSES else set())
    if kinds & allowed:
        return None
    if str(ds.get("BurnedInAnnotation", "") or "").upper() == "YES":
        return "BurnedInAnnotation is YES"
    if modality == "US":
        return "ultrasound images often carry burned-in text (allow_burned_in: [US] to send them)"
    if "SC" in kinds:
        return "secondary captures often carry burned-in text (allow_burned_in: [SC] to send them)"
    return None


def _identifiers(ds: Dataset) -> re.Pattern | None:
    tokens: set[str] = set()
    for kw in IDENTIFYING:
        value = ds.get(kw)
        if value is None or value == "":
            continue
        values = value if isinstance(value, (list, MultiValue)) else [value]
        for v in values:
            text = str(v)
            tokens.add(text.strip())
            tokens.update(t for t in re.split(r"[\^= ,]+", text) if len(t) >= 2)
    tokens.discard("")
    if not tokens:
        return None
    alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def _vocabulary(keyword: str) -> bool:
    return keyword in VOCABULARY_UIDS or "TransferSyntax" in keyword or "SOPClass" in keyword


class Deidentifier:
    def __init__(self, profile: Profile, key: bytes, allow_burned_in: frozenset[str] = frozenset()) -> None:
        self.profile = profile
        self.pseudonyms = Pseudonyms(key)
        self.allow_burned_in = frozenset(m.upper() for m in allow_burned_in)

    def apply(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place and return it; ``Refused`` when it must not be sent."""
        reason = burned_in_reason(ds, self.allow_burned_in)
        if reason:
            raise Refused(reason)
        patient = str(ds.get("PatientID", "") or "").strip() or f"study:{ds.get('StudyInstanceUID', '')}"
        run = _Run(self.profile, self.pseudonyms, patient, _identifiers(ds))
        run.walk(ds)
        self._method(ds)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            new = FileMetaDataset()
            new.TransferSyntaxUID = meta.TransferSyntaxUID
            new.MediaStorageSOPClassUID = ds.SOPClassUID
            new.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta = new
        return ds

    def _method(self, ds: Dataset) -> None:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = [METHOD, *self.profile.names]
        items = []
        for value, scheme, meaning in self.profile.codes:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = items
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if self.profile.shifts_dates else "REMOVED"


class _Run:
    """One dataset's de-identification: the patient's pseudonym, date shift and identifying words."""

    def __init__(self, profile: Profile, pseudonyms: Pseudonyms, patient: str, identifiers: re.Pattern | None):
        self.profile = profile
        self.pseudonyms = pseudonyms
        self.patient = patient
        self.identifiers = identifiers
        self.shift = dt.timedelta(days=pseudonyms.date_shift_days(patient))

    def walk(self, ds: Dataset) -> None:
        for elem in list(ds):
            action = self.profile.action(int(elem.tag))
            if action is None:
                if elem.VR == "SQ":
                    self._items(elem)
                elif elem.VR == "UI" and not _vocabulary(elem.keyword):
                    self._uids(elem)
                continue
            getattr(self, f"_{action}")(ds, elem)

    def _items(self, elem) -> None:
        for item in elem.value or ():
            self.walk(item)

    def _X(self, ds: Dataset, elem) -> None:
        del ds[elem.tag]

    def _Z(self, ds: Dataset, elem) -> None:
        elem.value = Sequence() if elem.VR == "SQ" else None

    def _K(self, ds: Dataset, elem) -> None:
        pass

    def _D(self, ds: Dataset, elem) -> None:
        if elem.VR == "SQ":
            self._items(elem)
        elif elem.VR == "UI":
            self._uids(elem)
        else:
            elem.value = DUMMY.get(elem.VR, DUMMY_TEXT)

    def _U(self, ds: Dataset, elem) -> None:
        if elem.VR == "SQ":
            self._items(elem)
        elif elem.VR == "UI":
            self._uids(elem)
        else:
            self._D(ds, elem)

    def _C(self, ds: Dataset, elem) -> None:
        if elem.VR == "SQ":
            self._items(elem)
        elif elem.VR in ("DA", "DT"):
            elem.value = self._shifted(elem.value, elem.VR)
        elif elem.VR in TEXT_VRS and self.identifiers is not None and elem.value not in (None, ""):
            values = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
            cleaned = [self.identifiers.sub("***", str(v)) for v in values]
            elem.value = cleaned if len(cleaned) > 1 else cleaned[0]

    def _P(self, ds: Dataset, elem) -> None:
        elem.value = self.pseudonyms.patient(self.patient)

    def _uids(self, elem) -> None:
        if isinstance(elem.value, (list, MultiValue)):
            elem.value = [self.pseudonyms.uid(str(v)) for v in elem.value]
        elif elem.value:
            elem.value = self.pseudonyms.uid(str(elem.value))

    def _shifted(self, value, vr: str):
        """Dates moved back by the patient's shift (time of day kept); a date that cannot be
        shifted exactly (partial, malformed) is emptied rather than kept."""
        values = value if isinstance(value, (list, MultiValue)) else [value]
        out = []
        for v in values:
            text = str(v or "")
            try:
                day = dt.datetime.strptime(text[:8], "%Y%m%d") - self.shift
            except ValueError:
                out.append("")
                continue
            out.append(day.strftime("%Y%m%d") + (text[8:] if vr == "DT" else ""))
        return out if len(out) > 1 else out[0]
