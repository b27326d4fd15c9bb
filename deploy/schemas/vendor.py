#!/usr/bin/env python3
"""Rebuilds the schemas under deploy/schemas/ from their PyPI packages.

cli/tests/deploy.rs validates compose.yaml and deploy/kubernetes/ against
these files, offline. To update them:

    python3 -m venv /tmp/v && /tmp/v/bin/pip download --no-deps -d /tmp/w \
        check-jsonschema==0.39.0 kubernetes-validate==1.37.0
    python3 deploy/schemas/vendor.py /tmp/w/check_jsonschema-*.whl \
        /tmp/w/kubernetes_validate-*.whl

Sources:
- compose-spec.json: the Compose specification's schema as vendored by
  check-jsonschema (its builtin_schemas/vendor/compose-spec.json), license
  in LICENSE.compose-spec (Apache-2.0).
- kubernetes/: the v1.37.0 "local-strict" schemas of kubernetes-validate
  (strict: additionalProperties false everywhere), license in
  LICENSE.kubernetes-validate (Apache-2.0). Only the kinds warren's
  manifests use are kept, and _definitions.json is cut down to the
  definitions those kinds reach: the full one is 1.8 MB. A manifest of
  another kind fails the test until its kind is added to KINDS here.
"""

import hashlib
import json
import pathlib
import sys
import zipfile

K8S_VERSION = "v1.37.0-local-strict"
# (file stem in kubernetes-validate) for every kind deploy/kubernetes uses.
KINDS = [
    "configmap-v1",
    "deployment-apps-v1",
    "job-batch-v1",
    "namespace-v1",
    "poddisruptionbudget-policy-v1",
    "secret-v1",
    "service-v1",
    "serviceaccount-v1",
]
DEFS_PREFIX = "/api/_definitions.json#/$defs/"

OUT = pathlib.Path(__file__).resolve().parent


def refs(node):
    """Every $ref string under node."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)


def local_name(ref):
    """The definition a $ref names, in _definitions.json or within it."""
    for prefix in (DEFS_PREFIX, "#/$defs/"):
        if ref.startswith(prefix):
            return ref[len(prefix):]
    raise SystemExit(f"unexpected $ref {ref!r}")


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")


def main(check_jsonschema_whl, kubernetes_validate_whl):
    with zipfile.ZipFile(check_jsonschema_whl) as z:
        base = "check_jsonschema/builtin_schemas/vendor/"
        data = z.read(base + "compose-spec.json")
        want = z.read(base + "sha256/compose-spec.sha256").decode().strip()
        if hashlib.sha256(data).hexdigest() != want:
            raise SystemExit("compose-spec.json does not match its sha256")
        (OUT / "compose-spec.json").write_bytes(data)
        (OUT / "LICENSE.compose-spec").write_bytes(
            z.read(base + "licenses/LICENSE.compose-spec")
        )

    with zipfile.ZipFile(kubernetes_validate_whl) as z:
        base = f"kubernetes_validate/kubernetes-json-schema/{K8S_VERSION}/"
        defs = json.loads(z.read(base + "_definitions.json"))
        kinds = {k: json.loads(z.read(base + k + ".json")) for k in KINDS}
        lic = [n for n in z.namelist() if n.endswith("/LICENSE") and "dist-info" in n]
        (OUT / "LICENSE.kubernetes-validate").write_bytes(z.read(lic[0]))

    keep, todo = set(), [local_name(r) for s in kinds.values() for r in refs(s)]
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        todo.extend(local_name(r) for r in refs(defs["$defs"][name]))
    defs["$defs"] = {k: v for k, v in defs["$defs"].items() if k in keep}

    k8s = OUT / "kubernetes" / K8S_VERSION
    write_json(k8s / "_definitions.json", defs)
    for k, s in kinds.items():
        write_json(k8s / (k + ".json"), s)
    print(f"{len(keep)} definitions kept for {len(kinds)} kinds")


if __name__ == "__main__":
    main(*sys.argv[1:3])
