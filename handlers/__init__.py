"""Handlers: registered analysis and rendering tasks the node runs on received series."""
