"""`malhae pull`: download a checkpoint from the Hugging Face hub, convert it, and put it in the model store.

The download goes into the ordinary hub cache (resumable, shared with transformers and every other tool) and takes
only what the converter reads: config, tokenizer, weights and the model card (for its license). When a repository has
both safetensors and PyTorch pickles, only the safetensors are fetched: they are the safe format and the same
weights. The store name is checked before anything is downloaded, so a taken name costs a second, not gigabytes.
A checkpoint already complete in the cache converts without a network (HF_HUB_OFFLINE=1 or no connection).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from malhae.errors import UserError
from malhae.store import catalog
from malhae.store.catalog import Entry

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "README.md",
               "generation_config.json")
SAFETENSORS = re.compile(r"(model.*\.safetensors|model\.safetensors\.index\.json)")
PICKLES = re.compile(r"(pytorch_model.*\.bin|pytorch_model\.bin\.index\.json)")
INSTALL_HINT = "pip install 'huggingface_hub>=0.23' (or: pip install \"malhae[hub]\")"


@dataclass(frozen=True)
class Source:
    hub_id: str
    entry: Entry | None  # the catalog entry, when the model is in the catalog
    store_name: str


@dataclass(frozen=True)
class Pulled:
    source: Source
    snapshot: Path  # the checkpoint folder in the hub cache
    offline: bool  # True: taken from the cache without asking the hub
    files: tuple[str, ...]
    result: object  # convert.pipeline.Result
    entry: object  # app.store.Entry


def resolve(name_or_hub_id: str, type_name: str, name: str | None = None) -> Source:
    """Which repository to fetch and the store name to give it; unknown catalog names are refused here."""
    from malhae.convert import types as out_types

    otype = out_types.get(type_name)
    text = name_or_hub_id.strip()
    entry = catalog.lookup(text)
    if entry is None and not HUB_ID.fullmatch(text):
        catalog.find(text)  # raises, with the nearest catalog name
    hub_id = entry.hub_id if entry else text
    base = entry.name if entry else hub_id.split("/")[-1].lower()
    return Source(hub_id, entry, name or f"{base}-{otype.name}")


def choose_files(repo_files: list[str]) -> list[str]:
    """The files the converter needs: small metadata, and the weights in one format (safetensors if present)."""
    top = [f for f in repo_files if "/" not in f]
    weights = [f for f in top if SAFETENSORS.fullmatch(f)]
    if not any(f.endswith(".safetensors") for f in weights):
        weights = [f for f in top if PICKLES.fullmatch(f)]
    if not any(f.endswith((".safetensors", ".bin")) for f in weights):
        raise UserError("the repository has no model weights malhae can read (model*.safetensors or "
                        "pytorch_model*.bin); check the hub id")
    return [f for f in top if f in SMALL_FILES] + sorted(weights)


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise UserError(f"pulling from the hub needs the huggingface_hub package: {INSTALL_HINT}") from None
    return huggingface_hub


def _offline_error(hub_id: str, type_name: str, why: str) -> UserError:
    return UserError(f"cannot reach the Hugging Face hub ({why}) and {hub_id} is not complete in the hub cache; to "
                     f"convert a copy you already have: malhae convert DIR --type {type_name} --add")


def _is_connection_error(e: BaseException) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    return isinstance(e, (OfflineModeIsEnabled, ConnectionError, TimeoutError)) or \
        type(e).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3") and \
        any(k in type(e).__name__ for k in ("Connect", "Timeout", "Network", "Transport", "Proxy"))


def download(hub_id: str, type_name: str, revision: str | None = None, *, cache_dir: Path | None = None,
             endpoint: str | None = None) -> tuple[Path, bool, tuple[str, ...]]:
    """The checkpoint's folder in the hub cache, downloading what is missing; (folder, offline, files)."""
    hub = _hub()
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    why = None
    files: list[str] = []
    try:
        # model_info, not list_repo_tree: one request without retries, so an unreachable hub is known at once
        info = hub.HfApi(endpoint=endpoint).model_info(hub_id, revision=revision, timeout=20)
        files = choose_files([s.rfilename for s in info.siblings or []])
    except GatedRepoError:
        raise UserError(f"{hub_id} is gated on the hub: accept its terms on huggingface.co and log in with "
                        "`hf auth login`, then pull again") from None
    except RepositoryNotFoundError:
        raise UserError(f"no model {hub_id} on the hub (or it is private); check the id, e.g. "
                        "EleutherAI/polyglot-ko-1.3b, or see `malhae models catalog`") from None
    except RevisionNotFoundError:
        raise UserError(f"{hub_id} has no revision {revision!r}; give a branch, tag or commit that exists") from None
    except HfHubHTTPError as e:
        why = f"the hub answered {getattr(e.response, 'status_code', '?')}"
    except Exception as e:
        if not _is_connection_error(e):
            raise
        why = "offline mode (HF_HUB_OFFLINE)" if type(e).__name__ == "OfflineModeIsEnabled" else "no connection"

    if why is not None:  # no hub: a snapshot already complete in the cache will do
        try:
            folder = hub.snapshot_download(hub_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                                           allow_patterns=["config.json"])
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise _offline_error(hub_id, type_name, why) from None
        except Exception as e:  # IncompleteSnapshotError and kin
            if type(e).__module__.startswith("huggingface_hub"):
                raise _offline_error(hub_id, type_name, why) from None
            raise
        path = Path(folder)
        present = sorted(p.name for p in path.iterdir())
        if not {"config.json", "tokenizer.json"} <= set(present):
            raise _offline_error(hub_id, type_name, why)
        try:
            chosen = choose_files(present)
        except UserError:
            raise _offline_error(hub_id, type_name, why) from None
        return path, True, tuple(chosen)

    try:
        folder = hub.snapshot_download(hub_id, revision=revision, cache_dir=cache_dir, endpoint=endpoint,
                                       allow_patterns=files)
    except Exception as e:
        if _is_connection_error(e) or isinstance(e, (HfHubHTTPError, LocalEntryNotFoundError)):
            raise UserError(f"the download of {hub_id} stopped ({type(e).__name__}); what arrived is kept in the "
                            "hub cache: run the same command again to resume") from None
        raise
    return Path(folder), False, tuple(files)


def pull(name_or_hub_id: str, type_name: str = "q4_k_m", *, name: str | None = None, force: bool = False,
         revision: str | None = None, threads: int | None = None, store=None,
         progress: Callable[[str, int, int], None] | None = None, cache_dir: Path | None = None,
         endpoint: str | None = None, before_convert: Callable[[Source, Path, bool], None] | None = None,
         imatrix: str | Path | None = None, merge: list | None = None) -> Pulled:
    """Resolve, refuse a taken store name or a missing imatrix, download (or use the cache), convert into the store.

    `merge`: convert.merge.Spec values, PEFT adapters merged before quantizing (read before downloading; their
    shapes are checked against the checkpoint once it is here, before converting). The default store name then
    names them: polyglot-ko-5.8b+my-adapter-q4_k_m."""
    from malhae.convert import imatrix as imatrix_file
    from malhae.convert import pipeline
    from malhae.convert import types as out_types
    from malhae.store.local import open_store

    source = resolve(name_or_hub_id, type_name, name)
    if merge:
        from dataclasses import replace

        from malhae.convert import lora

        adapters = [lora.read(spec.folder).name for spec in merge]  # a broken adapter folder costs no download
        if name is None:
            suffix = f"-{out_types.get(type_name).name}"
            source = replace(source, store_name="+".join([source.store_name.removesuffix(suffix), *adapters]) + suffix)
    imatrix = pipeline.check_imatrix_option(out_types.get(type_name), imatrix)
    if isinstance(imatrix, Path):
        imatrix_file.read(imatrix)  # a wrong file is known before gigabytes are downloaded
    store = store if store is not None else open_store()
    target = store.conversion_target(source.store_name, None, force)  # refuses a taken name before downloading
    snapshot, offline, files = download(source.hub_id, type_name, revision, cache_dir=cache_dir, endpoint=endpoint)
    if before_convert:
        before_convert(source, snapshot, offline)
    template = source.entry.template if source.entry else None
    result = pipeline.convert(snapshot, type_name, target.output, force=force, threads=threads, progress=progress,
                              template=template, imatrix=imatrix, merge=merge)
    entry = target.finish(result.path)
    return Pulled(source, snapshot, offline, files, result, entry)
