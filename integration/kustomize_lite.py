#!/usr/bin/env python3
"""Renders a kustomization the way `kubectl kustomize` does for the features manifests/ uses:
`resources` (files and directories with their own kustomization), `components`, and `patches`
with a `path` to a strategic-merge patch (maps merged, lists of named items merged by name, other
lists replaced). Anything else in a kustomization is an error, so a feature added to manifests/
without support here fails loudly instead of rendering wrong. Output: YAML documents on stdout,
in kustomize's order (resources depth-first, as listed).

Used by `make manifests` and integration/manifests.rs so neither depends on kubectl; where kubectl
is installed, `make manifests` also checks that both render the same objects.
"""
import os
import sys

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "components", "patches"}


def merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    if isinstance(base, list) and isinstance(patch, list):
        named = all(isinstance(x, dict) and "name" in x for x in base + patch)
        if named and base:
            out = list(base)
            for p in patch:
                for i, b in enumerate(out):
                    if b["name"] == p["name"]:
                        out[i] = merge(b, p)
                        break
                else:
                    out.append(p)
            return out
        return patch
    return patch


def key(obj):
    m = obj.get("metadata", {})
    return (obj.get("kind"), m.get("namespace"), m.get("name"))


def render(directory):
    path = os.path.join(directory, "kustomization.yaml")
    with open(path) as f:
        k = yaml.safe_load(f)
    unknown = set(k) - SUPPORTED
    if unknown:
        sys.exit(f"{path}: unsupported kustomization fields {sorted(unknown)}")
    objects = []
    for entry in k.get("resources", []) + k.get("components", []):
        target = os.path.join(directory, entry)
        if os.path.isdir(target):
            objects.extend(render(target))
        else:
            with open(target) as f:
                objects.extend(d for d in yaml.safe_load_all(f) if d)
    for p in k.get("patches", []):
        if set(p) != {"path"}:
            sys.exit(f"{path}: only patches with a path are supported")
        with open(os.path.join(directory, p["path"])) as f:
            patch = yaml.safe_load(f)
        matches = [i for i, o in enumerate(objects) if key(o) == key(patch)]
        if len(matches) != 1:
            sys.exit(f"{path}: patch {p['path']} matches {len(matches)} objects")
        objects[matches[0]] = merge(objects[matches[0]], patch)
    seen = set()
    for o in objects:
        if key(o) in seen:
            sys.exit(f"{path}: {key(o)} defined twice")
        seen.add(key(o))
    return objects


def same(a_path, b_path):
    """Whether two renderings hold the same objects (order aside)."""

    def load(p):
        with open(p) as f:
            return {key(o): o for o in yaml.safe_load_all(f) if o}

    a, b = load(a_path), load(b_path)
    diff = sorted(str(k) for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        sys.exit(f"{a_path} and {b_path} differ in: {', '.join(diff)}")


if __name__ == "__main__":
    if sys.argv[1] == "--same":
        same(sys.argv[2], sys.argv[3])
    else:
        docs = render(sys.argv[1])
        sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=True))
