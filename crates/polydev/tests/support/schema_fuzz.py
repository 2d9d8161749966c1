"""A schema-driven fuzzer for crates/polydev/tests/it/api.rs: reads
{server, token, ids, fixed, program, examples, loosen, refused} as JSON on stdin, fetches
/api/openapi.json and, for every operation with a JSON request body, sends
`examples` bodies that hypothesis-jsonschema generates from that
operation's schema (derandomized: the same bodies on every run). `ids`
maps a path template to the object its `{id}` names (else a fresh UUID);
`fixed` maps a path template to body fields set after generation (the
caller's own user id, so the handler gets past "who"); `program` maps a
path template to the program a generated `cmd` runs (its arguments stay
generated).
`refused` lists bodies (path, body, why) the schema itself must refuse.
`loosen` names a path whose schema loses its string patterns first, and
only that path is fuzzed: the positive control, proving that a schema
looser than the handler is seen.
Prints `ops`: per operation, how many bodies were sent and what came back
(status and error code, with one example body each), and `refused`: for
each of those bodies, whether the schema refused it. The Rust test owns
the assertions."""

import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
import uuid

# Hypothesis keeps a cache beside the working directory unless told
# otherwise: this run's goes away with it.
_storage = tempfile.TemporaryDirectory(prefix="polydev-hypothesis-")
os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = _storage.name

import jsonschema  # noqa: E402 - after the storage directory is set
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema


def resolve(node, components, depth=0):
    """Inlines `#/components/schemas/…` references (the document has no cycles)."""
    if depth > 32:
        raise ValueError("schema nests too deep")
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            return resolve(components[name], components, depth + 1)
        out = {}
        for k, v in node.items():
            if k in ("description", "example", "examples"):
                continue
            out[k] = resolve(v, components, depth + 1)
        # A pattern says more than a format name the generator may not know.
        if "pattern" in out:
            out.pop("format", None)
        elif out.get("format") == "password":
            out.pop("format")
        return out
    if isinstance(node, list):
        return [resolve(v, components, depth + 1) for v in node]
    return node


def strip_patterns(node):
    if isinstance(node, dict):
        return {k: strip_patterns(v) for k, v in node.items() if k not in ("pattern", "propertyNames")}
    if isinstance(node, list):
        return [strip_patterns(v) for v in node]
    return node


def send(server, method, path, token, body):
    req = urllib.request.Request(
        server + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"content-type": "application/json", "authorization": "Bearer " + token},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, None
    except urllib.error.HTTPError as e:
        try:
            code = json.load(e)["error"]["code"]
        except Exception:  # noqa: BLE001 - reported as what it is
            code = "<not an API error>"
        return e.code, code


def main() -> None:
    args = json.load(sys.stdin)
    with urllib.request.urlopen(args["server"] + "/api/openapi.json", timeout=10) as r:
        doc = json.load(r)
    components = doc.get("components", {}).get("schemas", {})
    formats = {"uuid": st.uuids().map(str)}
    report = {}
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            content = (op.get("requestBody") or {}).get("content", {})
            if "application/json" not in content:
                continue
            if args.get("loosen") and path != args["loosen"]:
                continue
            schema = resolve(content["application/json"]["schema"], components)
            if path == args.get("loosen"):
                schema = strip_patterns(schema)
            concrete = path.replace("{id}", args["ids"].get(path, str(uuid.uuid4())))
            outcomes = {}
            sent = [0]

            @settings(
                max_examples=args["examples"],
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(from_schema(schema, custom_formats=formats))
            def fuzz(body):
                body.update(args.get("fixed", {}).get(path, {}))
                if path in args.get("program", {}) and body.get("cmd"):
                    body["cmd"][0] = args["program"][path]
                status, code = send(args["server"], method.upper(), concrete, args["token"], body)
                sent[0] += 1
                key = f"{status} {code}" if code else str(status)
                outcomes.setdefault(key, {"count": 0, "example": json.dumps(body)[:300]})
                outcomes[key]["count"] += 1

            fuzz()
            report[f"{method.upper()} {path}"] = {"sent": sent[0], "outcomes": outcomes}
    refused = []
    # Bodies the handlers refuse for their shape must be outside the schema
    # too (what a fuzzer rarely generates: an exact reserved word, one
    # exotic white-space character).
    for case in args.get("refused", []):
        op = doc["paths"][case["path"]]["post"]
        schema = resolve(op["requestBody"]["content"]["application/json"]["schema"], components)
        valid = jsonschema.Draft202012Validator(schema).is_valid(case["body"])
        refused.append({"why": case["why"], "refused": not valid})
    if args.get("loosen") and not any(args["loosen"] == k.split(" ", 1)[1] for k in report):
        raise SystemExit(f"no operation at {args['loosen']} to loosen")
    json.dump({"ops": report, "refused": refused}, sys.stdout)


if __name__ == "__main__":
    main()
