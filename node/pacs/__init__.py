"""PACS synchronisation: query remote archives (C-FIND, QIDO-RS) and retrieve from them
(C-MOVE, C-GET, WADO-RS) into the node's normal receive path, as durable retrieve jobs."""
