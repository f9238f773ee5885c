"""Checkpoints named by hub references, resolved to local paths with the hubs' own clients.

    hf:OWNER/NAME[@REVISION]                       huggingface_hub.snapshot_download (safetensors + json only)
    kaggle:OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION]  kagglehub.model_download (a single .npz inside is chosen)

Both clients honour their caches and offline settings (HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT; KAGGLEHUB_CACHE),
so already-downloaded checkpoints resolve without a network. A key of the asset catalog (`pg2-3b-224`, parity/assets.py)
resolves to its weights in those caches, never downloading. Anything else is returned unchanged (a local path).
"""

from __future__ import annotations

import os

from parity.errors import CheckpointError

SCHEMES = ("hf:", "kaggle:")


def is_hub_ref(src: str | os.PathLike) -> bool:
    return isinstance(src, str) and src.startswith(SCHEMES) and not os.path.exists(src)


def resolve(src: str | os.PathLike) -> str:
    """A local path for `src` (downloading into the hub's cache if needed)."""
    if not is_hub_ref(src):
        from parity import assets  # a catalog key (`pg2-3b-224`): its downloaded weights, or exit 2 naming the download

        return assets.checkpoint_path(src) if assets.is_key(src) else os.fspath(src)
    scheme, ref = src.split(":", 1)
    try:
        if scheme == "hf":
            from huggingface_hub import snapshot_download

            repo, _, revision = ref.partition("@")
            return snapshot_download(repo, revision=revision or None, allow_patterns=["*.safetensors", "*.json"])
        import kagglehub

        path = kagglehub.model_download(ref)
    except ImportError as e:
        raise CheckpointError(f"{src}: needs the hub clients: pip install 'paligemma-parity[hub]' ({e})") from None
    except Exception as e:  # the clients raise many types (HTTP, offline, not found): one line for the user
        raise CheckpointError(
            f"{src}: cannot resolve ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if os.path.isdir(path):
        npz = sorted(f for f in os.listdir(path) if f.endswith(".npz"))
        if len(npz) == 1:
            return os.path.join(path, npz[0])
        if len(npz) > 1:
            raise CheckpointError(f"{src}: {path} holds several .npz files ({', '.join(npz)}); name one as a path")
    return path
