"""The PromQL of a Grafana dashboard, as a Prometheus rule file that promtool checks.

    dashboard_rules.py DASHBOARD.json                  prints one recording rule per expression
    dashboard_rules.py --configmap CM.yaml DASHBOARD.json
                                                       exits 1 unless the rendered ConfigMap
                                                       holds the dashboard unchanged

Every panel target's `expr` (rows' nested panels too) and every template variable's
`label_values(...)` selector is taken. Grafana's variables are replaced by values of the same
type ($__rate_interval by a duration, $namespace in a regex matcher by `.+`), so what promtool
parses is what Prometheus receives from Grafana.
"""

import json
import re
import sys

# Grafana's variables, by what they stand for in PromQL.
DURATIONS = ("$__rate_interval", "$__interval", "$__range")
VARIABLES = {"$namespace": ".+", "$job": ".+", "${namespace}": ".+", "${job}": ".+"}


def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def expressions(dashboard):
    """(where, expr) for each PromQL expression in the dashboard."""
    for p in panels(dashboard.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr"):
                yield f'panel {p["id"]} "{p["title"]}" {t["refId"]}', t["expr"]
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.+),\s*[a-zA-Z_]\w*\)", q.strip())
        if not m:
            sys.exit(f'variable {v["name"]}: not a label_values(selector, label) query: {q}')
        yield f'variable {v["name"]}', m.group(1)


def substitute(expr):
    for d in DURATIONS:
        expr = expr.replace(d, "5m")
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    if "$" in expr:
        sys.exit(f"unknown Grafana variable left in: {expr}")
    return expr


def rule_file(dashboard):
    out = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (where, expr) in enumerate(expressions(dashboard)):
        out.append(f"      # {where}")
        out.append(f"      - record: dashboard:expr_{i}")
        out.append(f"        expr: {json.dumps(substitute(expr))}")
    return "\n".join(out)


def configmap_holds(configmap_path, dashboard_text):
    """Whether the block scalar `moat.json: |-` of the ConfigMap is the dashboard file."""
    lines = open(configmap_path, encoding="utf-8").read().splitlines()
    try:
        start = [l.strip() for l in lines].index("moat.json: |-") + 1
    except ValueError:
        return False
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = []
    for line in lines[start:]:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        body.append(line[indent:])
    return "\n".join(body).rstrip("\n") == dashboard_text.rstrip("\n")


def main(argv):
    if argv[:1] == ["--configmap"]:
        text = open(argv[2], encoding="utf-8").read()
        json.loads(text)
        sys.exit(0 if configmap_holds(argv[1], text) else 1)
    print(rule_file(json.load(open(argv[0], encoding="utf-8"))))


if __name__ == "__main__":
    main(sys.argv[1:])
