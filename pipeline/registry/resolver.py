"""`fusionnet matte --model models:/late-fusion-matting@champion`: MLflow URIs -> a local model file.

Registered for fusionnet.inference.loading.resolve_model_path under entry-point group
`fusionnet.model_resolvers` (names "models" and "runs", the URI schemes), and `fusionnet pull` under
`fusionnet.model_pullers`.

One store per command (pipeline.tracking.store: MLFLOW_TRACKING_URI, else the mlflow.db of the project
holding the current folder or given by --project): the alias lookup, the download and the cache key
all use it, and a lookup never creates it. The model is downloaded once per registered version into a
cache (FUSIONNET_MODEL_CACHE, default ~/.cache/fusionnet/models), at
`<hash of the store>/<name>/<version>/<sha256 of the model file>` when the version records the
file's sha256 (tag fusionnet.checkpoint.sha256, set by the register step), else
`<hash of the store>/<name>/<version>`; other URIs (runs:/..., models:/m-<id>) under
`<hash of the store>/uri/<hash of the URI>`. Every use checks the cached file's sha256 against the
registry's (else the one recorded at download): a tampered or half-written entry is downloaded
again, and a download that does not match the registry is refused. An alias is looked up on every
call, so moving `champion` takes effect at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fusionnet.io.hashing import file_sha256
from pipeline.registry.models import PULLED_FILES, download_model, registered_version, weights_file
from pipeline.tracking import store as store_rule

CACHE_ENV = "FUSIONNET_MODEL_CACHE"
SHA_TAG = "fusionnet.checkpoint.sha256"  # on a registered version: sha256 of its model file
CACHE_RECORD = "fusionnet-cache.json"  # in a cache entry: the model file's sha256 when it was downloaded


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fusionnet" / "models")


def _client(store_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=store_uri, registry_uri=store_uri)


def _lookup(uri: str, store_uri: str) -> tuple[dict[str, str], str | None]:
    """({name, version} of a registered version, else {}), the sha256 the registry records for its file."""
    found = registered_version(uri, _client(store_uri))
    if found is None:
        return {}, None
    return {"name": found.name, "version": str(found.version)}, (found.tags.get(SHA_TAG) or None)


def cached_model_dir(uri: str, info: dict[str, str] | None = None, store_uri: str | None = None,
                     sha256: str | None = None) -> Path:
    """The cache folder for `uri` in store `store_uri` (default: this command's store; see the module doc).

    <store> is a hash of the store URI: version 1 of one registry is not version 1 of another.
    info, sha256: `_lookup(uri)` when the caller already has it (an alias is looked up once, not twice).
    """
    store_uri = store_uri or store_rule.tracking_uri(must_exist=True)
    store = cache_root() / hashlib.sha256(store_uri.encode()).hexdigest()[:12]
    if info is None:
        info, sha256 = _lookup(uri, store_uri)
    if info:
        folder = store / info["name"] / info["version"]
        return folder / sha256 if sha256 else folder
    return store / "uri" / hashlib.sha256(uri.encode()).hexdigest()[:24]


def _cached_sha256(folder: Path) -> str | None:
    try:
        return json.loads((folder / CACHE_RECORD).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _intact(folder: Path, expected: str | None) -> bool:
    """Whether cache entry `folder` is complete and its model file has sha256 `expected` (else the one
    recorded at download; an entry without either is not trusted)."""
    expected = expected or _cached_sha256(folder)
    try:
        return expected is not None and file_sha256(weights_file(folder)) == expected
    except (OSError, ValueError):
        return False


def resolve(spec: str) -> Path:
    """The fusionnet model file (safetensors) of MLflow model `spec`, downloaded if not cached.

    An alias is looked up once and the version it named is downloaded (models:/<name>/<version>), so
    an alias moved meanwhile cannot put another version's files in this version's cache folder.
    An unknown model, version or alias raises LookupError naming the URI and the store; no store
    raises pipeline.tracking.store.NoStoreError (a LookupError).
    """
    store_uri = store_rule.tracking_uri(must_exist=True)
    try:
        info, expected = _lookup(spec, store_uri)
        folder = cached_model_dir(spec, info, store_uri, expected)
        if (folder / "MLmodel").exists() and not _intact(folder, expected):
            print(f"note: {folder}: cached model is incomplete or does not match its sha256; downloading it again", file=sys.stderr)
        if not _intact(folder, expected):
            download_model(f"models:/{info['name']}/{info['version']}" if info else spec, folder, store_uri)
            got = file_sha256(weights_file(folder))
            if expected is not None and got != expected:
                raise LookupError(f"{spec}: the downloaded model file has sha256 {got}, but version "
                                  f"{info['version']} of {info['name']} records {expected} (MLflow store "
                                  f"{store_uri}); refusing it")
            (folder / CACHE_RECORD).write_text(json.dumps({"uri": spec, "store": store_uri, "sha256": got}))
    except MlflowException as exc:
        raise LookupError(f"{spec}: {exc.message} (MLflow store {store_uri})") from exc
    return weights_file(folder)


def check_pull_target(dest: str | os.PathLike, force: bool = False) -> None:
    """Refuse (FileExistsError naming it) a `dest` that pull would replace but did not write: a file, or a
    non-empty folder holding anything but the files listed in its PULLED_FILES. `force` allows it."""
    dest = Path(dest)
    if force or not (dest.exists() or dest.is_symlink()):
        return
    if not dest.is_dir() or dest.is_symlink():
        raise FileExistsError(f"{dest}: exists and is not a folder; nothing was changed (choose another --out, "
                              "or --force to replace it)")
    present = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if not p.is_dir()}
    try:
        ours = set((dest / PULLED_FILES).read_text().split("\n")) - {""}
    except OSError:
        ours = set()
    others = sorted(present - ours)
    if others:
        raise FileExistsError(
            f"{dest}: folder is not empty and was not written by `fusionnet pull` ({len(others)} other "
            f"file{'s' if len(others) != 1 else ''}, e.g. {others[0]}); nothing was changed (choose another --out, "
            "or --force to replace the folder and everything in it)")


def pull(spec: str, dest: str | os.PathLike, force: bool = False) -> Path:
    """Download MLflow model `spec` (default use: models:/late-fusion-matting@champion) to `dest`.

    Returns the folder; it holds the MLmodel, the pyfunc code, the fusionnet model file under
    artifacts/ and fusionnet-model.json (uri, name, version, alias). An existing `dest` is replaced
    only if pull wrote it (check_pull_target) or `force`.
    """
    check_pull_target(dest, force)
    store_uri = store_rule.tracking_uri(must_exist=True)
    try:
        return download_model(spec, dest, store_uri)
    except MlflowException as exc:
        raise LookupError(f"{spec}: {exc.message} (MLflow store {store_uri})") from exc


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.registry.resolver [URI] --out DIR`: what `fusionnet pull` does (see the module doc)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.registry.resolver", description="Download a registered model.")
    parser.add_argument("uri", nargs="?", default="models:/late-fusion-matting@champion")
    parser.add_argument("--out", required=True, type=Path, help="folder to write (one pull wrote is replaced)")
    parser.add_argument("--force", action="store_true", help="replace --out even if pull did not write it")
    parser.add_argument("--project", type=Path, help="the project whose mlflow.db to use (default: the current one)")
    args = parser.parse_args(argv)
    if args.project is not None:
        os.environ[store_rule.PROJECT_ENV] = str(args.project.resolve())
    try:
        folder = pull(args.uri, args.out, force=args.force)
    except (LookupError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.uri} -> {folder} (model file {weights_file(folder)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
