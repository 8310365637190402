"""Turn CustomResourceDefinition YAML files into the JSON schemas of this folder.

    python k8s/schemas/vendor.py [--version V] [--out DIR] CRD.yaml [CRD.yaml ...]

Works offline on local files (download the CRDs of the operator release first; SOURCES.md
names the files and releases used). For every CRD document it writes
``<group>_<version>_<kind lowercase>.json`` next to this script (or into ``--out``): the
``openAPIV3Schema`` of the storage version (or of ``--version``, which must be served), as
compact JSON, made usable by a plain JSON-schema validator (tests/unit/test_k8s_manifests.py):

* ``x-kubernetes-int-or-string: true`` nodes accept an integer or a string
  (``anyOf: [{type: integer}, {type: string}]``, any ``type`` removed);
* ``nullable: true`` nodes also accept ``null`` (``type: [T, "null"]``);
* ``x-kubernetes-group-version-kind`` (as in the cluster's own OpenAPI document) records which
  apiVersion and kind the schema is for.

Everything else (descriptions, ``x-kubernetes-*`` extensions, CEL ``x-kubernetes-validations``,
patterns, enums, oneOf) is kept as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]
# Keywords whose value is a schema, a list of schemas or a map of name -> schema.
SCHEMA_VALUED = {"items", "additionalProperties", "not"}
SCHEMA_LISTS = {"anyOf", "oneOf", "allOf"}
SCHEMA_MAPS = {"properties", "patternProperties", "definitions", "$defs"}


def convert(node: Any) -> Any:
    """A copy of the schema ``node`` in the form described in the module docstring."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in SCHEMA_VALUED and isinstance(value, dict):
            out[key] = convert(value)
        elif key in SCHEMA_LISTS and isinstance(value, list):
            out[key] = [convert(v) for v in value]
        elif key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: convert(v) for name, v in value.items()}
        else:
            out[key] = value
    if out.get("x-kubernetes-int-or-string") is True:
        out.pop("type", None)
        if out.get("anyOf") != INT_OR_STRING:
            if "anyOf" in out:  # keep an existing anyOf as a further constraint
                out["allOf"] = [*out.get("allOf", []), {"anyOf": out.pop("anyOf")}]
            out["anyOf"] = [dict(t) for t in INT_OR_STRING]
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def pick_version(crd: dict, wanted: str | None) -> dict:
    versions = crd["spec"]["versions"]
    if wanted is not None:
        for v in versions:
            if v["name"] == wanted:
                if not v.get("served"):
                    raise SystemExit(f"{crd['metadata']['name']}: version {wanted} is not served")
                return v
        names = [v["name"] for v in versions]
        raise SystemExit(f"{crd['metadata']['name']}: no version {wanted} (has {names})")
    storage = [v for v in versions if v.get("storage")]
    if len(storage) != 1:
        raise SystemExit(f"{crd['metadata']['name']}: expected one storage version")
    return storage[0]


def vendor(paths: list[Path], out_dir: Path, wanted: str | None) -> list[Path]:
    written = []
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            version = pick_version(doc, wanted)
            schema = convert(version["schema"]["openAPIV3Schema"])
            schema["x-kubernetes-group-version-kind"] = [
                {"group": group, "kind": kind, "version": version["name"]}
            ]
            target = out_dir / f"{group}_{version['name']}_{kind.lower()}.json"
            text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
            target.write_text(text + "\n", encoding="utf-8")
            written.append(target)
            print(f"{path} -> {target} ({len(text.encode()) / 1024:.0f} KiB)")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crds", nargs="+", type=Path, help="local CRD YAML files")
    parser.add_argument("--version", help="the CRD version to take (default: the storage one)")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: here)")
    args = parser.parse_args(argv)
    if not vendor(args.crds, args.out, args.version):
        print("no CustomResourceDefinition found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
