"""`fusionnet matte --model models:/late-fusion-matting@champion`: MLflow URIs -> a local model file.

Registered for fusionnet.inference.loading.resolve_model_path under entry-point group
`fusionnet.model_resolvers` (names "models" and "runs", the URI schemes). The model is downloaded
once per registered version into a cache (FUSIONNET_MODEL_CACHE, default
~/.cache/fusionnet/models/<store>/<name>/<version>); an alias is looked up in the registry on every call,
so moving `champion` takes effect at once. Other URIs (runs:/..., models:/m-<id>) are immutable
and cached under a hash of the URI.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mlflow.exceptions import MlflowException

from pipeline.registry.models import describe, download_model, weights_file
from pipeline.tracking.runs import tracking_uri

CACHE_ENV = "FUSIONNET_MODEL_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fusionnet" / "models")


def cached_model_dir(uri: str, info: dict[str, str] | None = None) -> Path:
    """The cache folder for `uri`: <store>/<name>/<version> for registered versions, else <store>/uri/<hash>.

    <store> is a hash of the tracking URI: version 1 of one registry is not version 1 of another.
    info: `describe(uri)` when the caller already has it (an alias is looked up once, not twice).
    """
    store = cache_root() / hashlib.sha256(tracking_uri().encode()).hexdigest()[:12]
    info = describe(uri) if info is None else info
    if info:
        return store / info["name"] / info["version"]
    return store / "uri" / hashlib.sha256(uri.encode()).hexdigest()[:24]


def resolve(spec: str) -> Path:
    """The fusionnet model file (safetensors) of MLflow model `spec`, downloaded if not cached.

    An alias is looked up once and the version it named is downloaded (models:/<name>/<version>), so
    an alias moved meanwhile cannot put another version's files in this version's cache folder.
    An unknown model, version or alias raises LookupError naming the URI and the tracking store.
    """
    try:
        info = describe(spec)
        folder = cached_model_dir(spec, info)
        if not (folder / "MLmodel").is_file():
            download_model(f"models:/{info['name']}/{info['version']}" if info else spec, folder)
    except MlflowException as exc:
        raise LookupError(f"{spec}: {exc.message} (MLflow store {tracking_uri()})") from exc
    return weights_file(folder)


def pull(spec: str, dest: str | os.PathLike) -> Path:
    """Download MLflow model `spec` (default use: models:/late-fusion-matting@champion) to `dest`.

    Returns the folder; it holds the MLmodel, the pyfunc code, the fusionnet model file under
    artifacts/ and fusionnet-model.json (uri, name, version, alias).
    """
    try:
        return download_model(spec, dest)
    except MlflowException as exc:
        raise LookupError(f"{spec}: {exc.message} (MLflow store {tracking_uri()})") from exc


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.registry.resolver [URI] --out DIR`: what `fusionnet pull` does (see the module doc)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m pipeline.registry.resolver", description="Download a registered model.")
    parser.add_argument("uri", nargs="?", default="models:/late-fusion-matting@champion")
    parser.add_argument("--out", required=True, type=Path, help="folder to create (replaced if it exists)")
    args = parser.parse_args(argv)
    folder = pull(args.uri, args.out)
    print(f"{args.uri} -> {folder} (model file {weights_file(folder)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
