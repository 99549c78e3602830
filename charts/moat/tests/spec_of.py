"""Prints the `spec` of the one Kubernetes object in a YAML file, de-indented: for a PrometheusRule,
a Prometheus rule file. Text only (no YAML library on a fresh machine): the object must be block
style, with `spec:` at the top level, as the chart renders it."""

import sys


def main(path: str) -> None:
    lines = open(path, encoding="utf-8").read().splitlines()
    try:
        start = lines.index("spec:") + 1
    except ValueError:
        sys.exit(f"{path}: no top-level spec:")
    body = []
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break  # the next top-level key or document
        body.append(line[2:] if line.startswith("  ") else line)
    if not body:
        sys.exit(f"{path}: spec is empty")
    print("\n".join(body))


if __name__ == "__main__":
    main(sys.argv[1])
