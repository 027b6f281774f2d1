#!/usr/bin/env python3
"""Render and lint catena's Helm chart with real Helm (v4, through the
helm-python-sdk package, which bundles Helm's Go SDK as a shared library), for
tests/e2e/tests/chart.rs.

    render.py CHART [--set EXPR]... [-f VALUES.yaml]... [--name N] [--namespace NS] [--lint]

--set is parsed by Helm's own strvals parser, so `--set cni.customConf=true`
becomes a boolean exactly as with the helm binary; -f files and --set
expressions are merged in order, later wins, as helm does.

Prints one JSON object on stdout:
  {"manifests": {template path: text}, "crds": [{"name", "data"}], "lint": {...}}
or, when Helm refuses (a `fail` in a template, a schema violation):
  {"error": {"type": class name, "message": text}}   (exit status 2)
Exit status 3: helm-python-sdk is not installed (the caller skips, loudly).
"""

import argparse
import json
import sys

try:
    import helm_python as helm
except ImportError as e:  # pragma: no cover - depends on the machine
    print(json.dumps({"missing": f"helm-python-sdk is not installed ({e}); run tests/setup.sh"}))
    sys.exit(3)


def merge(into, new):
    """Deep-merge `new` into `into` (maps merge, everything else replaces)."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


def main():
    p = argparse.ArgumentParser()
    p.add_argument("chart")
    p.add_argument("--set", action="append", default=[], dest="sets")
    p.add_argument("-f", "--values", action="append", default=[], dest="files")
    p.add_argument("--name", default="catena")
    p.add_argument("--namespace", default="kube-system")
    p.add_argument("--lint", action="store_true")
    a = p.parse_args()

    values = {}
    try:
        for path in a.files:
            with open(path, encoding="utf-8") as f:
                merge(values, helm.values_from_yaml(f.read()))
        for expr in a.sets:
            merge(values, helm.parse_set_string(expr))
        with helm.Chart.load(a.chart) as chart:
            out = {
                "manifests": chart.render(values=values, name=a.name, namespace=a.namespace),
                "crds": [{"name": c["name"], "data": c["data"]} for c in chart.crds],
                "values": chart.merge_values(values),
                "helm": helm.helm_sdk_version(),
            }
        if a.lint:
            out["lint"] = helm.lint(a.chart, values, namespace=a.namespace)
    except helm.HelmError as e:
        print(json.dumps({"error": {"type": type(e).__name__, "message": str(e)}}))
        sys.exit(2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
