"""The HTTP routes this server answers, named once: the ingress declares them, the catalog
says which a model serves, the registration tells the nodes, the guards and the access log
recognise them."""

from __future__ import annotations

CHAT = "/v1/chat/completions"
GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
MODELS = "/v1/models"
FILES = "/v1/files/images"
"""Generated images, by name: `FILES/<name>`."""
