"""The served OpenAPI document, as a client generator sees it, for
crates/polydev/tests/it/api.rs: reads {server, token, dir} as JSON on stdin,
fetches /api/openapi.json, validates it (openapi-spec-validator), generates
a Python client from it (openapi-python-client), imports every module of
that client and calls a few operations through it. Prints what it saw as
JSON; the Rust test owns the assertions."""

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import urllib.request

from openapi_spec_validator import validate


def main() -> None:
    args = json.load(sys.stdin)
    with urllib.request.urlopen(args["server"] + "/api/openapi.json", timeout=10) as r:
        doc = json.load(r)
    validate(doc)
    spec = os.path.join(args["dir"], "openapi.json")
    with open(spec, "w") as f:
        json.dump(doc, f)
    config = os.path.join(args["dir"], "config.json")
    with open(config, "w") as f:
        json.dump({"post_hooks": []}, f)
    gen = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "openapi-python-client"),
            "generate",
            "--path", spec,
            "--config", config,
            "--meta", "none",
            "--output-path", os.path.join(args["dir"], "polydev_client"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if gen.returncode != 0:
        sys.exit("generation failed: " + gen.stdout + gen.stderr)
    sys.path.insert(0, args["dir"])
    import polydev_client
    from polydev_client import AuthenticatedClient, Client
    from polydev_client.api.health import health
    from polydev_client.api.sandboxes import create_sandbox, delete, get_sandbox
    from polydev_client.api.users import me
    from polydev_client.models import (
        CreateBody,
        ErrorBody,
        SandboxDetail,
        SandboxView,
        Template,
        UserView,
    )

    modules = [
        m.name
        for m in pkgutil.walk_packages(polydev_client.__path__, "polydev_client.")
    ]
    for name in modules:
        importlib.import_module(name)
    operations = [m for m in modules if m.startswith("polydev_client.api.") and m.count(".") == 3]

    anon = Client(base_url=args["server"])
    authed = AuthenticatedClient(base_url=args["server"], token=args["token"])
    health_status = health.sync_detailed(client=anon).status_code
    you = me.sync(client=authed)
    missing = get_sandbox.sync(id="sb-0000000000000000", client=authed)
    # A real sandbox through the typed models: the schemas match what the
    # server answers (from_dict fails on a missing or mistyped field).
    made = create_sandbox.sync(client=authed, body=CreateBody(template=Template.MINIMAL))
    made_ok = isinstance(made, SandboxView)
    detail = get_sandbox.sync(id=made.id, client=authed) if made_ok else None
    deleted = delete.sync_detailed(id=made.id, client=authed).status_code if made_ok else None
    print(json.dumps({
        "operations": len(operations),
        "documented": sum(
            1 for ops in doc["paths"].values() for m in ops
            if m in ("get", "put", "post", "delete", "patch")
        ),
        "warnings": gen.stdout.count("WARNING") + gen.stderr.count("WARNING"),
        "health": int(health_status),
        "meIsUserView": isinstance(you, UserView),
        "email": you.email if isinstance(you, UserView) else None,
        "missingIsErrorBody": isinstance(missing, ErrorBody),
        "missingCode": missing.error.code if isinstance(missing, ErrorBody) else None,
        "created": made.status.value if made_ok else repr(made),
        "detail": detail.status.value if isinstance(detail, SandboxDetail) else repr(detail),
        "deleted": int(deleted) if deleted is not None else None,
    }))


main()
