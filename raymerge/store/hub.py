"""Inputs on the Hugging Face Hub: `hf://ORG/NAME[@REVISION][/SUBFOLDER]`, fetched by
huggingface_hub into its own cache (`HF_HUB_CACHE`, shared with transformers), only the files an
input needs.

A plan pins each Hub input to the commit its revision named then (`hf://org/name@<commit>/sub`):
every worker reads that commit, a merge's record names it, and a rerun that finds the branch
moved to other files says so as for any changed input. The token is huggingface_hub's own
(`HF_TOKEN`, or the file `hf auth login` writes): raymerge never prints, writes or ships it,
and reads it only to strip it from an error text it quotes. `HF_HUB_OFFLINE=1` reads the cache
only.

Example:
    >>> ref = parse("hf://acme/loras@v2/math")
    >>> ref.repo_id, ref.revision, ref.subfolder
    ('acme/loras', 'v2', 'math')
    >>> pinned("hf://acme/loras@v2/math", "0123456789abcdef0123456789abcdef01234567")
    'hf://acme/loras@0123456789abcdef0123456789abcdef01234567/math'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from raymerge.errors import InputError

PREFIX = "hf://"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""What an adapter needs from its repo: PEFT's config and safetensors weights (never a pickle)."""
MODEL_METADATA = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
"""A base model's files other than its weights: what a plan reads to check it."""
MODEL_FILES = (*MODEL_METADATA, "*.safetensors")
"""Everything a worker loads a base model from."""
READ_TIMEOUT_SECONDS = 60.0
CONNECT_TIMEOUT_SECONDS = 10.0
"""Deadlines of every Hub request huggingface_hub makes for raymerge (its shared client waits
for ever by default); a download is a stream of reads, each bounded."""
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_REVISION = re.compile(r"^[\w.%-]{1,255}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubRef:
    """A location on the Hub: a model repo, a revision (None: its default branch) and a folder."""

    repo_id: str
    revision: str | None
    subfolder: str

    def uri(self, revision: str | None = None) -> str:
        rev = revision or self.revision
        at = f"@{quote(rev, safe='')}" if rev else ""
        return f"{PREFIX}{self.repo_id}{at}" + (f"/{self.subfolder}" if self.subfolder else "")


def is_hub(uri: str) -> bool:
    return uri.strip().lower().startswith(PREFIX)


def parse(uri: str) -> HubRef:
    """The parts of an `hf://` location; ValueError saying what is malformed."""
    rest = uri.strip()[len(PREFIX) :].strip("/")
    parts = rest.split("/")
    if len(parts) < 2:
        raise ValueError(f"{uri!r} is not hf://ORG/NAME[@REVISION][/SUBFOLDER]")
    name, _, revision = parts[1].partition("@")
    repo_id, subfolder = f"{parts[0]}/{name}", "/".join(parts[2:])
    if not _REPO.match(repo_id):
        raise ValueError(f"{uri!r}: {repo_id!r} is not a Hub repository id (ORG/NAME)")
    if revision and not _REVISION.match(revision):
        raise ValueError(
            f"{uri!r}: revision {revision!r} is not a branch, tag or commit (write a '/' in it "
            "as %2F)"
        )
    if subfolder and any(part in ("", ".", "..") for part in subfolder.split("/")):
        raise ValueError(f"{uri!r}: subfolder {subfolder!r} must be a plain path in the repo")
    return HubRef(repo_id, unquote(revision) if revision else None, subfolder)


def canonical(uri: str) -> str:
    """The location as one spelling: `hf://` lower-case, no trailing slash."""
    return parse(uri).uri()


def pinned(uri: str, commit: str) -> str:
    """`uri` with its revision replaced by `commit`."""
    return parse(uri).uri(commit)


def commit_of(uri: str) -> str | None:
    """The commit a pinned location names, None if its revision is a branch or tag."""
    revision = parse(uri).revision
    return revision if revision and _COMMIT.match(revision) else None


def fetch(uri: str, patterns: tuple[str, ...], what: str) -> tuple[Path, str]:
    """(the local folder of `uri`, its commit): the files matching `patterns` under its
    subfolder, downloaded into the Hub cache unless there already. `what` names the input in an
    InputError (not found, private, offline and not cached, unreachable)."""
    from huggingface_hub import snapshot_download

    ref = parse(uri)
    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    _bound_requests()
    try:
        snapshot = Path(
            snapshot_download(
                ref.repo_id,
                revision=ref.revision,
                allow_patterns=[prefix + p for p in patterns],
                etag_timeout=CONNECT_TIMEOUT_SECONDS,
            )
        )
    except Exception as exc:  # huggingface_hub's errors, httpx's, OSError: all named below
        raise InputError(f"{what}: {describe(exc, ref)}") from None
    return snapshot / ref.subfolder, snapshot.name


def listing(uri: str) -> set[str] | None:
    """The names of the files under a pinned location's subfolder at its commit, from the
    Hub cache's record of the commit's tree (None where the cache holds no such record)."""
    from huggingface_hub import get_cached_repo_tree

    ref = parse(uri)
    try:
        files = get_cached_repo_tree(ref.repo_id, revision=ref.revision)
    except Exception:  # no tree recorded for it: unknown, not empty
        return None
    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    return {f.path[len(prefix) :] for f in files if f.path.startswith(prefix)}


def describe(exc: BaseException, ref: HubRef) -> str:
    """What went wrong fetching `ref`, and what to do; never the token."""
    from huggingface_hub import errors

    name = f"{ref.repo_id} on the Hugging Face Hub"
    if isinstance(exc, errors.GatedRepoError):
        return (
            f"{name} is gated: accept its terms on the Hub, then give a token that may read "
            "it (HF_TOKEN, or `hf auth login`)"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (
            f"{name} does not exist or is private: check the name, or give a token that may "
            "read it (HF_TOKEN, or `hf auth login`)"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{name} has no revision {ref.revision!r}: give a branch, tag or commit it has"
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return (
            f"{name} cannot be reached ({_offline_or_down()}) and the Hub cache "
            f"({_cache_dir()}) does not hold {ref.uri()}'s files; fetch it once where the Hub "
            "is reachable (same HF_HUB_CACHE), or fix the network"
        )
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        return f"{name} answered HTTP {status}; try again later"
    return f"cannot fetch {ref.uri()} from {name}: {type(exc).__name__}: {_redacted(str(exc))}"


def _offline_or_down() -> str:
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "no answer"


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _redacted(text: str) -> str:
    """`text` without the token, should a library ever put it into a message."""
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text


def _bound_requests() -> None:
    """Give huggingface_hub's shared HTTP client deadlines, unless it has its own read one."""
    from huggingface_hub import get_session

    session = get_session()
    if session.timeout.read is None:
        bounded = type(session.timeout)(READ_TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS)
        session.timeout = bounded
