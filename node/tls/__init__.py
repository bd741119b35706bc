"""DICOM TLS (PS3.15 secure transport): SSL contexts for the SCP and for C-STORE destinations,
the calling-AE-to-certificate binding, and development certificates."""
from node.tls.contexts import binding_violation, client_tls_args, peer_identity, server_context, uvicorn_tls_options

__all__ = ["binding_violation", "client_tls_args", "peer_identity", "server_context", "uvicorn_tls_options"]
