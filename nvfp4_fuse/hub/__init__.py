"""All Hugging Face Hub access, one module per concern.

- ``download``: resolve a source (folder or repo id, through the HF cache);
- ``headers``: a repo's shard headers by range requests, as local reads give them;
- ``upload``: push a conversion and check the Hub's hashes;
- ``card``: the model card;
- ``errors`` / ``retry``: which failures are transient, and one clear line for each.

Everything goes through ``huggingface_hub`` (2.x), so ``HF_TOKEN``, ``HF_HOME``/``HF_HUB_CACHE``,
``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` behave as users expect (the library reads them once, at import).
"""

from __future__ import annotations

from ..errors import PushFailed, PushVerificationFailed
from .card import default_serve_hint, push_card, render_model_card
from .download import resolve_source
from .headers import RemoteHeaders, remote_safetensors_headers
from .upload import PushResult, local_upload_files, push, verify_remote

__all__ = [
    "PushFailed",
    "PushResult",
    "PushVerificationFailed",
    "RemoteHeaders",
    "default_serve_hint",
    "local_upload_files",
    "push",
    "push_card",
    "remote_safetensors_headers",
    "render_model_card",
    "resolve_source",
    "verify_remote",
]
