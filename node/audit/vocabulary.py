"""The audit vocabulary: DICOM audit message codes (PS3.15 A.5, PS3.16 CID 400-403), as data.

Entries carry these codes next to Hilum's own short event name so a SIEM that knows IHE ATNA /
DICOM audit messages can map them without a Hilum-specific dictionary.
"""
from __future__ import annotations

# Event ID (CID 400) and Event Type (CID 401-403): (code value, scheme, meaning)
APPLICATION_ACTIVITY = ("110100", "DCM", "Application Activity")
AUDIT_LOG_USED = ("110101", "DCM", "Audit Log Used")
INSTANCES_ACCESSED = ("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = ("110104", "DCM", "DICOM Instances Transferred")
EXPORT = ("110106", "DCM", "Export")
SECURITY_ALERT = ("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = ("110114", "DCM", "User Authentication")

APPLICATION_START = ("110120", "DCM", "Application Start")
APPLICATION_STOP = ("110121", "DCM", "Application Stop")
LOGIN = ("110122", "DCM", "Login")
LOGOUT = ("110123", "DCM", "Logout")
NODE_AUTHENTICATION = ("110126", "DCM", "Node Authentication")
SOFTWARE_CONFIGURATION = ("110131", "DCM", "Software Configuration")
USER_SECURITY_ATTRIBUTES_CHANGED = ("110137", "DCM", "User security Attributes Changed")

# Event Action Code (PS3.15 A.5.1)
CREATE, READ, UPDATE, DELETE, EXECUTE = "C", "R", "U", "D", "E"

# Event Outcome Indicator
SUCCESS = 0
MINOR_FAILURE = 4
SERIOUS_FAILURE = 8
MAJOR_FAILURE = 12
OUTCOMES = (SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE)
ACTIONS = (CREATE, READ, UPDATE, DELETE, EXECUTE)


def code(c: tuple[str, str, str]) -> dict[str, str]:
    return {"code": c[0], "system": c[1], "display": c[2]}
