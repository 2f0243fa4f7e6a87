"""What ONNX export and ONNX int8 quantisation share: their error, and writing `fusionnet.*` metadata."""

from __future__ import annotations

from fusionnet.onnx.runtime import META_PREFIX


class ExportError(Exception):
    """The export could not be made or did not pass its check; nothing was written."""


def set_metadata(proto, values: dict[str, str]) -> None:
    """Set `fusionnet.<key>` metadata_props on an onnx ModelProto (replacing ones of the same key)."""
    keep = [p for p in proto.metadata_props if p.key[len(META_PREFIX):] not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"{META_PREFIX}{key}", str(value)
